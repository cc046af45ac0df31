"""mergekit's dtype rule: the output dtype is ``out_dtype``, else ``dtype``, else the base
tensor's; the arithmetic runs in float32 (``compute_dtype`` asks for another precision) and is
rounded once. ``plan``, the card and ``config.json`` say which dtype the output has.

The accuracy test runs every registered method (its spec's example, as the contract suite
does) and holds its 16-bit output to within 1 ulp of the method's own reference computed in
float64 on the same inputs and rounded once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_family
from safetensors.torch import load_file, save_file
from test_method_contract import NAMES, recipe_doc
from test_streaming_equals_reference import load_output

from streammerge import parse_recipe, run_merge
from streammerge.cli import main
from streammerge.methods import METHODS, TensorId
from streammerge.plan import layer_positions, tensor_params
from streammerge.reference import reference_merge

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return make_family(tmp_path / "m", k=2, dtype=BF16)


def ta(base: Path, fts: list[Path], **top: object) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(f), "parameters": {"weight": w}}
            for f, w in zip(fts, [0.7, 0.4], strict=True)
        ],
        **top,
    }


@pytest.mark.parametrize(
    ("keys", "compute", "out"),
    [
        ({}, F32, None),  # the base's dtype, per tensor
        ({"dtype": "float16"}, F32, F16),  # mergekit's examples: dtype is the output's
        ({"dtype": "bfloat16"}, F32, BF16),  # computed in float32, rounded once
        ({"dtype": "float32", "out_dtype": "bfloat16"}, F32, BF16),  # out_dtype wins
        ({"dtype": "bfloat16", "out_dtype": "float32"}, F32, F32),
        ({"out_dtype": "fp16"}, F32, F16),
        ({"dtype": "float64"}, F64, F64),  # never less precise than mergekit, which computes in it
        ({"dtype": "bfloat16", "compute_dtype": "bfloat16"}, BF16, BF16),  # asked explicitly
        ({"compute_dtype": "float64", "out_dtype": "float16"}, F64, F16),
    ],
)
def test_output_and_compute_dtype_of_a_recipe(family, keys, compute, out):
    r = parse_recipe(ta(*family, **keys))
    assert (r.dtype, r.out_dtype) == (compute, out)
    assert r.warnings == ()  # compute_dtype is a known key


def test_bad_compute_dtype_names_the_key(family):
    from streammerge import RecipeError

    with pytest.raises(RecipeError, match=r"compute_dtype.*'int4'"):
        parse_recipe(ta(*family, compute_dtype="int4"))


def test_dtype_sets_the_output_tensors_and_config(family, tmp_path):
    """``dtype: float16`` on a bf16 family writes float16 (it used to write bfloat16)."""
    run_merge(parse_recipe(ta(*family, dtype="float16")), tmp_path / "out", max_memory=2**32)
    got = load_output(tmp_path / "out")
    assert got["layer.0.mlp.weight"].dtype == F16
    assert got["position_ids"].dtype == torch.int64  # not a float: copied as it is
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg == {"model_type": "toy", "torch_dtype": "float16"}  # mergekit sets it too
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- dtypes: output float16 (dtype), compute float32" in card


def test_config_keeps_its_key_and_the_base_dtype_without_a_dtype(family, tmp_path):
    base, fts = family
    (base / "config.json").write_text(json.dumps({"model_type": "toy", "dtype": "bfloat16"}))
    run_merge(parse_recipe(ta(base, fts, out_dtype="float32")), tmp_path / "a", max_memory=2**32)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg == {"model_type": "toy", "dtype": "float32"}  # transformers 5's key, updated
    run_merge(parse_recipe(ta(base, fts)), tmp_path / "b", max_memory=2**32)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_output(tmp_path / "b")["layer.0.mlp.weight"].dtype == BF16
    card = (tmp_path / "b" / "README.md").read_text()
    assert "- dtypes: output bfloat16 (as in the base), compute float32" in card


def test_plan_shows_the_dtypes(family, tmp_path):
    base, fts = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(ta(base, fts, dtype="bfloat16", compute_dtype="float64")))
    res = CliRunner().invoke(main, ["plan", str(recipe), str(tmp_path / "o"), "--no-calibrate"])
    assert res.exit_code == 0, res.output
    assert "dtypes: output bfloat16 (dtype), compute float64" in res.output
    res = CliRunner().invoke(main, ["plan", str(recipe), str(tmp_path / "o"), "--no-calibrate",
                                    "--json"])  # fmt: skip
    assert json.loads(res.output)["dtypes"] == "output bfloat16 (dtype), compute float64"


def ordered(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers in value order (ulp steps; +0 and -0 both 0)."""
    bits = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("name", NAMES)
def test_16_bit_output_within_one_ulp_of_float64(name, dtype, tmp_path):
    """A mergekit-style ``dtype: bfloat16`` (or float16) recipe on a float32 family, streamed,
    writes that dtype, and every element is within 1 ulp of the method's reference computed in
    float64 and rounded once, or else no farther from it than the same reference computed in
    the 16-bit dtype (mergekit's arithmetic, and streammerge's before the rule).

    The family's float32 values are 16-bit values, so every precision sees the same inputs and
    the same task vectors: what differs is the arithmetic alone (with inputs rounded in float32,
    a magnitude selection among tied ``|tau|`` would differ by precision, which is no accuracy
    question)."""
    spec = METHODS[name].spec
    base, fts = make_family(tmp_path / "m", k=2, dtype=dtype, seed=3)
    for folder in (base, *fts):
        f = folder / "model.safetensors"
        save_file({n: t.float() if t.is_floating_point() else t
                   for n, t in load_file(f).items()}, f)  # fmt: skip
    dname = str(dtype).removeprefix("torch.")
    recipe = parse_recipe({**recipe_doc(spec, base, fts), "dtype": dname})
    run_merge(recipe, tmp_path / "out", chunk_elems=136, max_memory=2**32)
    got = load_output(tmp_path / "out")
    names = [n for n, *_ in reference_merge(recipe)]
    positions = layer_positions(names)
    tensors = [load_file(p / "model.safetensors") for p in (base, *fts[: len(recipe.models)])]
    bad: list[str] = []
    for tname in names:
        b = tensors[0][tname]
        if not b.is_floating_point():
            continue
        params, options = tensor_params(recipe, tname, positions[tname])
        tid = TensorId(tname, b.numel(), tuple(b.shape))

        merged = []
        for compute in (F64, dtype):
            fts_ = [t[tname].to(compute) for t in tensors[1:]]
            r = METHODS[name].reference(tid, b.to(compute), fts_, params, options, compute)
            merged.append(r.out.reshape(b.shape))
        exact, narrow = merged[0], merged[1].to(dtype)
        ours = got[tname]
        assert ours.dtype == dtype
        ok = torch.isfinite(exact)
        assert torch.equal(torch.isfinite(ours), ok), tname
        ulps = (ordered(ours) - ordered(exact.to(dtype))).abs()
        farther = (ours.double() - exact).abs() > (narrow.double() - exact).abs()
        off = ok & (ulps > 1) & farther
        if off.any():
            i = int(off.flatten().nonzero()[0])
            bad.append(f"{tname}[{i}]: {float(ours.flatten()[i])!r} vs float64 "
                       f"{float(exact.flatten()[i])!r}, 16-bit {float(narrow.flatten()[i])!r} "
                       f"({int(off.sum())} such)")  # fmt: skip
    assert not bad, f"{name}: " + "; ".join(bad)
