"""The contract every registered merge method meets, run over the whole registry (as zarr-python
runs one store test class against every store). A method added later gets all of it by being
registered: its spec's ``example`` parameters drive every test.

* the in-memory chunked path equals the method's reference, byte for byte, at chunk lengths
  that split tensors awkwardly (and rows, and n:m blocks);
* a streamed ``run`` equals the reference, masks included;
* a run interrupted after a few chunks and rerun gives the bytes of an uninterrupted one;
* reruns are deterministic;
* every declared range, type, choice and requirement is enforced with the spec's error;
* the spec is coherent (kernel names, card columns, statistics vs chunk-locality).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_family
from test_streaming_equals_reference import load_output, same_bytes

import streammerge.engine as engine
from streammerge import RecipeError, parse_recipe, run_merge
from streammerge.mask_store import MemoryMaskStore
from streammerge.methods import METHODS, TensorId
from streammerge.methods.base import ChunkLocalMethod, run_chunked
from streammerge.methods.kernels import KERNELS
from streammerge.methods.spec import MethodSpec
from streammerge.reference import reference_merge

NAMES = sorted(METHODS)
AWKWARD = [1, 7, 40, 136, 1000, 4097]
"""Chunk lengths (rounded up to each method's alignment) that cut rows and blocks."""


def models_for(spec: MethodSpec) -> int:
    return max(spec.min_models, min(2, spec.max_models or 2))


def recipe_doc(spec: MethodSpec, base: Path, fts: list[Path], **changes: Any) -> dict:
    """The spec's example as a recipe over ``fts``; per-model weights differ when declared."""
    models = []
    for k, f in enumerate(fts[: models_for(spec)]):
        own = {"weight": [1.0, 0.6][k]} if "weight" in spec.per_model else {}
        models.append({"model": str(f), "parameters": own})
    doc: dict[str, Any] = {"merge_method": spec.name, "models": models,
                           "parameters": {**spec.example, **changes}}  # fmt: skip
    if spec.needs_base:
        doc["base_model"] = str(base)
    return doc


@pytest.fixture(params=NAMES)
def spec(request) -> MethodSpec:
    return METHODS[request.param].spec


@pytest.fixture
def fam(tmp_path: Path) -> tuple[Path, list[Path]]:
    return make_family(tmp_path / "m", k=2, dtype=torch.bfloat16, shards=(2, 1))


def test_spec_is_coherent(spec: MethodSpec) -> None:
    method = METHODS[spec.name]
    assert method.name == spec.name
    assert spec.kernel in (None, *KERNELS)
    if isinstance(method, ChunkLocalMethod):
        assert spec.stats == (), "a chunk-local method declares no statistics passes"
    for p in spec.params:
        assert spec.param(p.name) is p
    assert set(spec.example) <= spec.per_model | spec.global_only


def test_chunked_equals_reference_in_memory(spec: MethodSpec) -> None:
    method = METHODS[spec.name]
    recipe_like = {**spec.example}
    g = torch.Generator().manual_seed(1)
    n = 3 * 4096 + 91
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    k = models_for(spec)
    fts = [(base.float() + torch.randint(-4, 5, (n,), generator=g) / 512).to(torch.bfloat16)
           for _ in range(k)]  # fmt: skip
    values = {p.name: recipe_like.get(p.name, p.default) for p in spec.params}
    params = [method.model_params({n_: v for n_, v in values.items()
                                   if spec.param(n_).per_model}) for _ in range(k)]  # type: ignore[union-attr]  # fmt: skip
    options = method.options({n_: v for n_, v in values.items() if not spec.param(n_).per_model})  # type: ignore[union-attr]
    tensor = TensorId("model.layers.0.mlp.up_proj.weight", n)
    ref = method.reference(tensor, base, fts, params, options, torch.float32)
    for chunk in AWKWARD:
        got = run_chunked(method, tensor, base, fts, params, options, torch.float32, chunk)
        assert same_bytes(got.out, ref.out), chunk
        assert (got.masks is None) == (ref.masks is None)
        for a, b in zip(got.masks or [], ref.masks or [], strict=True):
            assert torch.equal(a, b), chunk


@pytest.mark.parametrize("chunk", [136, 10**6])  # shorter ones: in memory, above
def test_streamed_run_equals_reference(spec: MethodSpec, fam, tmp_path: Path, chunk: int) -> None:
    base, fts = fam
    recipe = parse_recipe(recipe_doc(spec, base, fts))
    store = MemoryMaskStore()
    run_merge(recipe, tmp_path / "out", chunk_elems=chunk, max_memory=2**32, mask_store=store)
    got = load_output(tmp_path / "out")
    checked = with_masks = 0
    for name, expected, masks in reference_merge(recipe):
        assert same_bytes(got[name], expected), name
        for k, m in enumerate(masks or []):
            assert torch.equal(store.read(k, name), m), (name, k)
        checked += 1
        with_masks += masks is not None
    assert checked == len(got)
    assert (with_masks > 0) == spec.writes_masks


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "streammerge.json"}  # fmt: skip


def test_interrupted_run_resumes_to_the_same_bytes(
    spec: MethodSpec, fam, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, fts = fam
    recipe = parse_recipe(recipe_doc(spec, base, fts))
    calls = {"n": 0, "crash_at": 0}
    check = engine.Scheduler._check_stop

    def crash(self: engine.Scheduler) -> None:  # called after each chunk is handed over
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise RuntimeError("simulated crash")
        check(self)

    monkeypatch.setattr(engine.Scheduler, "_check_stop", crash)
    monkeypatch.setattr(engine, "JOURNAL_INTERVAL_S", 0.0)  # journal every chunk at once
    run_merge(recipe, tmp_path / "whole", chunk_elems=136, max_memory=2**32)
    run_merge(recipe, tmp_path / "again", chunk_elems=136, max_memory=2**32)
    assert files(tmp_path / "whole") == files(tmp_path / "again"), "not deterministic"
    calls["crash_at"] = calls["n"] // 4 + 1  # past the first tensors, before the end
    calls["n"] = 0

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_merge(recipe, tmp_path / "cut", chunk_elems=136, max_memory=2**32)
    assert not (tmp_path / "cut" / "streammerge.json").exists()
    monkeypatch.setattr(engine.Scheduler, "_check_stop", check)
    summary = run_merge(recipe, tmp_path / "cut", chunk_elems=136, max_memory=2**32)
    assert summary.resumed_chunks > 0
    assert files(tmp_path / "cut") == files(tmp_path / "whole")


def bad_values(spec: MethodSpec) -> list[tuple[str, Any]]:
    """One invalid value per declared constraint."""
    out: list[tuple[str, Any]] = []
    for p in spec.params:
        if p.kind == "choice":
            out.append((p.name, "no-such-choice"))
        if p.low is not None:
            out.append((p.name, p.low - 1))
        if p.high is not None:
            out.append((p.name, p.high + 1))
        if p.kind == "int":
            out.append((p.name, 1.5))
        if not p.gradient and p.kind in ("int", "float"):
            out.append((p.name, [1, 2]))
    return out


def test_bad_parameters_get_the_spec_error(spec: MethodSpec, fam) -> None:
    base, fts = fam
    for name, value in bad_values(spec):
        with pytest.raises(RecipeError, match=name):
            parse_recipe(recipe_doc(spec, base, fts, **{name: value}))
    for p in spec.params:
        if p.required:
            doc = recipe_doc(spec, base, fts)
            doc["parameters"].pop(p.name, None)
            for m in doc["models"]:
                m["parameters"].pop(p.name, None)
            with pytest.raises(RecipeError, match=p.name):
                parse_recipe(doc)
    if spec.max_models is not None:
        doc = recipe_doc(spec, base, fts)
        doc["models"] = [{"model": str(f)} for f in fts[: spec.max_models + 1]]
        if len(doc["models"]) > spec.max_models:
            with pytest.raises(RecipeError, match="model"):
                parse_recipe(doc)


def test_no_method_name_is_tested_outside_methods() -> None:
    """Behaviour is read from specs: no source file outside ``methods/`` names a method."""
    import re

    import streammerge

    package = Path(streammerge.__file__).parent
    names = "|".join(re.escape(n) for n in NAMES)
    pattern = re.compile(rf"""["']({names})["']""")
    offenders = [
        f"{p.relative_to(package)}:{i}: {line.strip()}"
        for p in sorted(package.rglob("*.py"))
        if "methods" not in p.relative_to(package).parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
