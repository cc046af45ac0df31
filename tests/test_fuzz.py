"""Property-based fuzzing of everything that parses user files: the safetensors header parser,
the index reader, and the recipe loader. Arbitrary bytes and mutations of valid files must give
either a parsed result or the project's own error type (one ``error:`` line in the CLI), never
another exception. Budgets are bounded (``FUZZ_EXAMPLES``, no deadline) so CI time stays fixed.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_family
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from streammerge.errors import StreamMergeError
from streammerge.model import ModelFolder
from streammerge.recipe import load_recipe
from streammerge.safetensors_io import read_header

FUZZ_EXAMPLES = int(os.environ.get("STREAMMERGE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
VALID_HEADER = {
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
    "b": {"dtype": "F32", "shape": [4], "data_offsets": [12, 28]},
}


def st_file(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def parse_or_refuse(fn, *args) -> None:
    """``fn(*args)`` returns, or raises the project's error, and nothing else."""
    try:
        fn(*args)
    except StreamMergeError as e:
        assert str(e) and "\n" not in str(e)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_as_a_shard(tmp_path_factory, blob: bytes) -> None:
    p = tmp_path_factory.mktemp("f") / "model.safetensors"
    p.write_bytes(blob)
    parse_or_refuse(read_header, p)


def _json_values() -> st.SearchStrategy:
    scalars = (
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    )
    return st.recursive(
        scalars,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                                  max_size=4),
        max_leaves=12,
    )  # fmt: skip


@FUZZ
@given(
    field=st.sampled_from(["dtype", "shape", "data_offsets"]),
    tensor=st.sampled_from(["a", "b"]),
    value=_json_values(),
    cut=st.integers(0, 40),
)
def test_mutated_valid_header(tmp_path_factory, field: str, tensor: str, value, cut: int) -> None:
    header = json.loads(json.dumps(VALID_HEADER))
    header[tensor][field] = value
    text = json.dumps(header).encode()
    p = tmp_path_factory.mktemp("f") / "model.safetensors"
    p.write_bytes(st_file(text, bytes(28))[: max(0, len(text) + 36 - cut)])
    parse_or_refuse(read_header, p)


@FUZZ
@given(st.binary(max_size=300) | _json_values().map(lambda v: json.dumps(v).encode()))
def test_arbitrary_index(tmp_path_factory, blob: bytes) -> None:
    folder = tmp_path_factory.mktemp("m")
    save_file({"w": torch.zeros(2)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_bytes(blob)

    def open_close() -> None:
        ModelFolder(folder).close()

    parse_or_refuse(open_close)


@pytest.fixture(scope="module")
def small_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("fam"), k=2, shapes={"w": (4, 4)})


VALID_RECIPE = {
    "merge_method": "cabs",
    "base_model": "BASE",
    "models": [{"model": "FT1", "parameters": {"weight": 1.0}}, {"model": "FT2"}],
    "parameters": {"n_val": 2, "m_val": 4},
    "dtype": "float32",
}


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_as_a_recipe(tmp_path_factory, blob: bytes) -> None:
    p = tmp_path_factory.mktemp("r") / "recipe.yaml"
    p.write_bytes(blob)
    parse_or_refuse(load_recipe, p)


RECIPE_KEYS = ["merge_method", "models", "parameters", 0, 1, "model", "weight", "n_val",
               "m_val", "dtype", "base_model"]  # fmt: skip


@FUZZ
@given(
    path=st.lists(
        st.sampled_from(
            [
                "merge_method",
                "models",
                "parameters",
                0,
                1,
                "model",
                "weight",
                "n_val",
                "m_val",
                "dtype",
                "base_model",
            ]
        ),
        min_size=1,
        max_size=3,
    ),
    value=_json_values(),
)
def test_mutated_valid_recipe(tmp_path_factory, small_family, path: list, value) -> None:
    root = tmp_path_factory.mktemp("r")
    base, fts = small_family
    doc = json.loads(
        json.dumps(VALID_RECIPE).replace("BASE", str(base)).replace("FT1", str(fts[0]))
        .replace("FT2", str(fts[1]))
    )  # fmt: skip
    node = doc
    for key in path[:-1]:  # walk where the path exists, then replace the last key's value
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
    with contextlib.suppress(IndexError, TypeError):
        node[path[-1]] = value
    p = root / "recipe.yaml"
    p.write_text(yaml.safe_dump(doc))
    parse_or_refuse(load_recipe, p)
