"""An unknown ``merge_method`` says whether it is a mergekit method streammerge lacks or a typo
("did you mean ..."), instead of one list for both."""

from __future__ import annotations

from pathlib import Path

import pytest

from streammerge import RecipeError, parse_recipe
from streammerge.methods import METHODS
from streammerge.recipe import MERGEKIT_METHODS

LACKING = sorted(MERGEKIT_METHODS - set(METHODS))
LACKS = "is a mergekit method that streammerge does not implement"


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    """Empty model folders: the recipe only checks that they exist."""
    out = {}
    for name in ("base", "ft1", "ft2"):
        out[name] = tmp_path / "models" / name
        out[name].mkdir(parents=True)
    return out


def doc(f: dict[str, Path], method: object) -> dict:
    return {
        "merge_method": method,
        "base_model": str(f["base"]),
        "models": [{"model": str(f["ft1"])}, {"model": str(f["ft2"])}],
        "parameters": {"weight": 1.0},
    }


def error(f: dict[str, Path], method: object) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(doc(f, method))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_mergekits_registry_names():
    assert len(MERGEKIT_METHODS) == 20
    assert {"slerp", "karcher", "model_stock", "della_linear", "ramplus_tl"} <= MERGEKIT_METHODS
    # what streammerge has of mergekit's methods is registered under mergekit's names
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "slerp"} <= set(METHODS)


@pytest.mark.parametrize("name", LACKING or ["-"])
def test_a_mergekit_method_streammerge_lacks(folders, name):
    if name == "-":
        pytest.skip("streammerge has every mergekit method")
    msg = error(folders, name)
    assert f"merge_method {name!r} {LACKS}" in msg
    assert "did you mean" not in msg
    for ours in METHODS:
        assert ours in msg  # what it does have


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("slerpp", "slerp"), ("tie", "ties"), ("TIES", "ties"), ("Dare-Ties", "dare_ties"),
     ("task-arithmetic", "task_arithmetic"), ("linaer", "linear"), ("cab", "cabs")],
)  # fmt: skip
def test_a_typo_of_a_streammerge_method(folders, typo, meant):
    msg = error(folders, typo)
    assert f"merge_method {typo!r} is neither a streammerge nor a mergekit method" in msg
    assert f"did you mean {meant!r}" in msg
    assert LACKS not in msg


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("karcer", "karcher"), ("model-stock", "model_stock"), ("della_lin", "della_linear"),
     ("breadcrumb", "breadcrumbs")],
)  # fmt: skip
def test_a_typo_of_a_mergekit_method_says_which_kind_it_is(folders, typo, meant):
    msg = error(folders, typo)
    assert "did you mean" in msg and repr(meant) in msg
    if meant in METHODS:
        assert f"{meant!r} (mergekit's" not in msg
    else:
        assert f"{meant!r} (mergekit's, not in streammerge)" in msg


@pytest.mark.parametrize("name", ["frobnicate", "zzz", ""])
def test_nothing_close(folders, name):
    msg = error(folders, name)
    assert "is neither a streammerge nor a mergekit method" in msg
    assert "did you mean" not in msg
    assert "streammerge has: " in msg


@pytest.mark.parametrize("value", [3, None, ["ties"], {"name": "ties"}])
def test_not_a_string(folders, value):
    msg = error(folders, value)
    assert "merge_method" in msg and repr(value) in msg


def test_known_names_still_parse(folders):
    for name in ("ties", "task_arithmetic", "linear"):
        assert parse_recipe(doc(folders, name)).method == name
