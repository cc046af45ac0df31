"""arcee_fusion: chunked == in-memory reference byte for byte (row-wise and flattened, rows
shorter and longer than a block), close to a float64 numpy implementation of mergekit's
formula, exact quantiles, recipe checks and an end-to-end run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import make_family
from test_streaming_equals_reference import load_output, same_bytes

from streammerge import parse_recipe, run_merge
from streammerge.errors import RecipeError
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId, arcee_fusion
from streammerge.methods.arcee_fusion import add_row_sums, quantile_positions, row_length
from streammerge.methods.base import run_chunked
from streammerge.reference import reference_merge

FUSION = METHODS["arcee_fusion"]
P = [ModelParams(1.0)]
OPTS = MethodOptions()


@dataclass(frozen=True, slots=True)
class ShapedId(TensorId):
    """A tensor id that also carries the shape (rows are its last dimension)."""

    shape: tuple[int, ...] = ()


def numpy_fusion(a: np.ndarray, b: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
    """mergekit's arcee_fusion in float64 numpy, exact quantiles: (output, mask)."""
    a2, b2 = a.astype(np.float64).reshape(-1, row), b.astype(np.float64).reshape(-1, row)

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(b2) + 1e-8, softmax(a2) + 1e-8
    kl = np.sum(p * np.log(p / q), axis=1, keepdims=True)
    imp = (np.abs(b2 - a2) * kl).ravel()
    s = np.sort(imp)
    n = s.size
    q1, med, q3 = (s[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    mask = imp >= med + 1.5 * (q3 - q1)
    return a.ravel() + (b.ravel() - a.ravel()) * mask, mask


def pair(rows: int, row: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A base and a model whose rows drift by different amounts (so KL varies by row)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, row, generator=g)
    scale = torch.rand(rows, 1, generator=g) ** 3
    b = a + torch.randn(rows, row, generator=g) * scale
    return a.flatten().to(dtype), b.flatten().to(dtype)


CASES = [(40, 24), (3, 5000), (7, 1), (1, 9000), (20, 4000)]
"""(rows, row length): short rows, rows longer than a block, one-element rows, one row, and a
tensor above SMALL (radix-select quantiles rather than a sort)."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "row"), CASES)
def test_chunked_equals_reference_any_chunk(dtype, rows, row):
    a, b = pair(rows, row, 1, dtype)
    n = a.numel()
    for tid in (ShapedId("w", n, (rows, row)), TensorId("w", n)):
        ref = FUSION.reference(tid, a, [b], P, OPTS, torch.float32).out
        for chunk in (None, 1, 7, 40, 4097, n - 1):
            got = run_chunked(FUSION, tid, a, [b], P, OPTS, torch.float32, chunk).out
            assert same_bytes(got, ref), (tid, chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "row"), [(40, 24), (3, 5000), (200, 64), (300, 320)])
def test_close_to_numpy_mergekit_formula(dtype, rows, row):
    a, b = pair(rows, row, 2, dtype)
    n = a.numel()
    got = run_chunked(FUSION, ShapedId("w", n, (rows, row)), a, [b], P, OPTS, torch.float32,
                      4096).out  # fmt: skip
    want, mask = numpy_fusion(a.float().numpy(), b.float().numpy(), row)
    assert 0 < mask.sum() < n  # the threshold does select some elements
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("rows", "row"), [(40, 24), (3, 5000), (1, 9000), (1, 1), (2, 2)])
def test_radix_quantiles_equal_the_sort(monkeypatch, rows, row):
    a, b = pair(rows, row, 6)
    n = a.numel()
    tid = ShapedId("w", n, (rows, row))
    small = run_chunked(FUSION, tid, a, [b], P, OPTS, torch.float32, 4096).out
    monkeypatch.setattr(arcee_fusion, "SMALL", 0)  # every tensor takes the radix path
    state = FUSION.new_state(tid, P, OPTS, torch.float32)
    assert state.small is None and state.topk
    radix = run_chunked(FUSION, tid, a, [b], P, OPTS, torch.float32, 4096).out
    assert same_bytes(radix, small)
    assert same_bytes(radix, FUSION.reference(tid, a, [b], P, OPTS, torch.float32).out)


def test_flattened_when_the_id_has_no_shape():
    a, b = pair(30, 40, 3)
    got = FUSION.reference(TensorId("w", 1200), a, [b], P, OPTS, torch.float32).out
    want, _ = numpy_fusion(a.numpy(), b.numpy(), 1200)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    assert row_length(TensorId("w", 1200)) == 1200
    assert row_length(ShapedId("w", 1200, (30, 40))) == 40
    assert row_length(ShapedId("s", 1, ())) == 1


def test_identical_models_and_scalars():
    a, _ = pair(4, 8, 4)
    got = FUSION.reference(ShapedId("w", 32, (4, 8)), a, [a.clone()], P, OPTS, torch.float32)
    assert torch.equal(got.out, a)  # importance 0 everywhere: threshold 0, every element is b = a
    x, y = torch.tensor([0.5]), torch.tensor([0.25])
    got = run_chunked(FUSION, TensorId("s", 1), x, [y], P, OPTS, torch.float32).out
    assert torch.equal(got, y)  # a single element: KL 0, importance 0 >= threshold 0


def test_quantile_positions_are_mergekits_below_2_24():
    for n in (1, 2, 3, 4, 5, 10, 101, 4097, 10**6 + 3):
        q = torch.tensor([0.25, 0.5, 0.75]) * (n - 1)
        assert quantile_positions(n) == q.long().tolist(), n


def test_row_sums_do_not_depend_on_the_split():
    g = torch.Generator().manual_seed(5)
    for row in (1, 3, 24, 4096, 5000, 20000):
        v = torch.randn(3 * 4096 + 1000 if row < 20000 else 40000, generator=g).double().numpy()
        whole = np.zeros(-(-v.size // row))
        add_row_sums(v, 0, row, whole)
        for step in (4096, 8192, 3 * 4096):
            parts = np.zeros_like(whole)
            for s in range(0, v.size, step):
                add_row_sums(v[s : s + step], s, row, parts)
            assert parts.tobytes() == whole.tobytes(), (row, step)
        sums = [np.sum(v[s : s + row]) for s in range(0, v.size, row)]
        np.testing.assert_allclose(whole, sums, rtol=1e-12, atol=1e-12)


def _recipe(base, fts) -> dict:
    return {
        "merge_method": "arcee_fusion",
        "base_model": str(base),
        "models": [{"model": str(p)} for p in fts],
    }


def test_model_count_is_checked(tmp_path):
    base, fts = make_family(tmp_path / "m", k=2)
    with pytest.raises(RecipeError, match="model"):
        parse_recipe(_recipe(base, fts))
    a, b = pair(2, 3)
    with pytest.raises(ValueError, match="exactly one"):
        FUSION.reference(TensorId("w", 6), a, [b, b], P * 2, OPTS, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_run_merge_matches_reference(tmp_path, dtype):
    base, fts = make_family(tmp_path / "m", k=1, dtype=dtype)
    recipe = parse_recipe(_recipe(base, fts))
    run_merge(recipe, tmp_path / "out", chunk_elems=40, max_memory=2**30)
    got = load_output(tmp_path / "out")
    n = 0
    for name, expected, _ in reference_merge(recipe):
        assert same_bytes(got[name], expected), name
        n += 1
    assert n == len(got)
