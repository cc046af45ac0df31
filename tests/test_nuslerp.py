"""nuslerp: chunked == in-memory reference byte for byte (flattened, per row, per column, with
and without base), close to a plain float64 numpy nuslerp written from mergekit's formula,
the weight -> t mapping, and an end-to-end run against reference_merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_family
from test_streaming_equals_reference import load_output, same_bytes

from streammerge import parse_recipe, run_merge
from streammerge.methods import METHODS, MethodOptions, ModelParams
from streammerge.methods.base import run_chunked
from streammerge.methods.nuslerp import ShapedTensorId
from streammerge.reference import reference_merge

NU = METHODS["nuslerp"]


def numpy_nuslerp(t, v0, v1, dim=-1, flatten=True):
    """mergekit's nuslerp, in plain float64 numpy."""
    shape = v0.shape
    a, b = v0.astype(np.float64), v1.astype(np.float64)
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif dim != -1:
        a, b = np.swapaxes(a, dim, -1), np.swapaxes(b, dim, -1)
    na = np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-7)
    nb = np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-7)
    cos = np.clip(np.sum(a / na * (b / nb), axis=-1, keepdims=True), -1, 1)
    colinear = (1 - cos**2) <= 1e-16
    th = np.arccos(np.where(colinear, 0, cos))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)
    r = np.where(colinear, (1 - t) * a + t * b, r)
    if dim != -1 and not flatten:
        r = np.swapaxes(r, dim, -1)
    return r.reshape(shape)


def mergekit_nuslerp(w, base, fts, flatten=True, row_wise=False, use_base=True):
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dim = 0 if row_wise else -1
    b = base.astype(np.float64)
    x = [f.astype(np.float64) for f in fts]
    if use_base:
        return b + numpy_nuslerp(t, x[0] - b, x[1] - b, dim, flatten)
    return numpy_nuslerp(t, x[0], x[1], dim, flatten)


MODES = {
    "flat": {},
    "rows": {"nuslerp_flatten": 0.0},
    "cols": {"nuslerp_flatten": 0.0, "nuslerp_row_wise": 1.0},
    "flat_nobase": {"ignore_base": 1.0},
    "rows_nobase": {"nuslerp_flatten": 0.0, "ignore_base": 1.0},
    "cols_nobase": {"nuslerp_flatten": 0.0, "nuslerp_row_wise": 1.0, "ignore_base": 1.0},
}


def family(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    fts = [(b + 0.7 * torch.randn(shape, generator=g) + 0.3 * k).to(dtype) for k in range(2)]
    return b.to(dtype), fts


def params(w0=1.0, w1=0.6):
    return [ModelParams(w0), ModelParams(w1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shape", [(96, 437), (3 * 4096 + 5,), (5, 8192)])
def test_chunked_equals_reference_any_chunk(dtype, mode, shape):
    b, fts = family(shape, 1, dtype)
    n = b.numel()
    tid = ShapedTensorId("w", n, shape)
    opts = MethodOptions(extra=tuple(sorted(MODES[mode].items())))
    ref = NU.reference(tid, b, fts, params(), opts, torch.float32).out
    for chunk in (1, 7, 4097, 3 * 4096 + 5, n - 1, None):
        got = run_chunked(NU, tid, b, fts, params(), opts, torch.float32, chunk).out
        assert same_bytes(got, ref), chunk


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shape", [(96, 437), (2000,), (4, 6, 300)])
@pytest.mark.parametrize("w", [(1.0, 0.6), (0.2, 0.9), (1.0, -1.0)])
def test_close_to_numpy_nuslerp(mode, shape, w):
    b, fts = family(shape, 2)
    m = MODES[mode]
    tid = ShapedTensorId("w", b.numel(), shape)
    opts = MethodOptions(extra=tuple(sorted(m.items())))
    got = run_chunked(
        NU, tid, b.flatten(), [f.flatten() for f in fts], params(*w), opts, torch.float32, 5000
    ).out
    want = mergekit_nuslerp(
        w,
        b.numpy(),
        [f.numpy() for f in fts],
        "nuslerp_flatten" not in m,
        "nuslerp_row_wise" in m,
        "ignore_base" not in m,
    )
    np.testing.assert_allclose(got.numpy(), want.reshape(-1), rtol=1e-5, atol=1e-5)


def test_row_length_without_shape_matches_shape():
    from streammerge.methods import TensorId

    b, fts = family((96, 437), 3)
    bf, ff = b.flatten(), [f.flatten() for f in fts]
    for m in ({"nuslerp_flatten": 0.0}, {"nuslerp_flatten": 0.0, "nuslerp_row_wise": 1.0}):
        shaped = NU.reference(
            ShapedTensorId("w", bf.numel(), (96, 437)),
            bf,
            ff,
            params(),
            MethodOptions(extra=tuple(sorted(m.items()))),
            torch.float32,
        )
        opts = MethodOptions(extra=tuple(sorted({**m, "row_length": 437.0}.items())))
        got = run_chunked(
            NU, TensorId("w", bf.numel()), bf, ff, params(), opts, torch.float32, 4097
        )
        assert same_bytes(got.out, shaped.out)
    with pytest.raises(ValueError, match="row_length"):
        NU.reference(
            TensorId("w", bf.numel()),
            bf,
            ff,
            params(),
            MethodOptions(extra=(("nuslerp_flatten", 0.0),)),
            torch.float32,
        )


def test_one_dimensional_is_one_vector_in_every_mode():
    b, fts = family((3000,), 4)
    tid = ShapedTensorId("w", 3000, (3000,))
    outs = [
        NU.reference(
            tid, b, fts, params(), MethodOptions(extra=tuple(sorted(m.items()))), torch.float32
        ).out
        for k, m in MODES.items()
        if "nobase" not in k
    ]
    assert all(same_bytes(o, outs[0]) for o in outs)


def test_colinear_rows_fall_back_to_lerp_and_weights_give_t():
    b = torch.zeros(4, 100)
    d = torch.randn(4, 100)
    fts = [b + d, b + 3 * d]  # every row colinear
    tid = ShapedTensorId("w", 400, (4, 100))
    opts = MethodOptions(extra=(("nuslerp_flatten", 0.0),))
    got = NU.reference(
        tid, b.flatten(), [f.flatten() for f in fts], params(1.0, 3.0), opts, torch.float32
    ).out
    t = 0.75
    np.testing.assert_allclose(
        got.numpy(), ((1 - t) * d + t * 3 * d).flatten().numpy(), rtol=1e-6, atol=1e-6
    )
    # weights summing to ~0 give t = 0.5; t = 1 returns the second model
    half = NU.reference(
        tid, b.flatten(), [f.flatten() for f in fts], params(1.0, -1.0), opts, torch.float32
    ).out
    np.testing.assert_allclose(half.numpy(), (2 * d).flatten().numpy(), rtol=1e-6, atol=1e-6)


def _doc(base: Path, fts: list[Path], weights, **parameters) -> dict:
    models = [
        {"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, weights, strict=True)
    ]
    return {
        "merge_method": "nuslerp",
        "base_model": str(base),
        "models": models,
        "parameters": parameters,
    }


@pytest.mark.parametrize(
    "parameters",
    [
        {},
        {"ignore_base": True},
        {"nuslerp_flatten": False, "row_length": [{"filter": "norm", "value": 24}, {"value": 24}]},
    ],
)
def test_run_merge_equals_reference_merge(tmp_path: Path, parameters):
    shapes = {
        "embed.weight": (37, 24),
        "layer.0.attn.weight": (24, 24),
        "layer.0.mlp.weight": (50, 24),
        "layer.0.norm.weight": (24,),
        "layer.1.attn.weight": (24, 24),
    }
    base, fts = make_family(tmp_path / "m", k=2, shapes=shapes)
    recipe = parse_recipe(_doc(base, fts, [[1.0, 0.2], 0.5], **parameters))
    run_merge(recipe, tmp_path / "out", chunk_elems=40, max_memory=2**30)
    got = load_output(tmp_path / "out")
    n = 0
    for name, expected, _ in reference_merge(recipe):
        assert same_bytes(got[name], expected), name
        n += 1
    assert n == len(shapes)


def test_gradient_weight_changes_t_per_layer(tmp_path: Path):
    base, fts = make_family(tmp_path / "m", k=2)
    recipe = parse_recipe(_doc(base, fts, [1.0, [1.0, 0.0]]))
    p0 = recipe.model_params(1, "layer.0.attn.weight", 0.0)
    p1 = recipe.model_params(1, "layer.0.attn.weight", 1.0)
    assert (p0.weight, p1.weight) == (1.0, 0.0)


@pytest.mark.parametrize("row_wise", [0.0, 1.0])
@pytest.mark.parametrize("n", [96 * 437 + 100, 300])
def test_row_length_with_a_partial_last_row(row_wise, n):
    """As the plan's probe merges a synthetic chunk: rows of row_length, the last one short
    (a tensor no longer than a row is one vector)."""
    from streammerge.methods import TensorId

    b, fts = family((n,), 5, torch.bfloat16)
    m = {"nuslerp_flatten": 0.0, "nuslerp_row_wise": row_wise, "row_length": 437.0}
    opts, tid = MethodOptions(extra=tuple(sorted(m.items()))), TensorId("w", n)
    ref = NU.reference(tid, b, fts, params(), opts, torch.float32).out
    for chunk in (1, 4097, n - 1):
        got = run_chunked(NU, tid, b, fts, params(), opts, torch.float32, chunk).out
        assert same_bytes(got, ref), chunk
    if n < 437:
        flat = NU.reference(tid, b, fts, params(), MethodOptions(), torch.float32).out
        assert same_bytes(ref, flat)
