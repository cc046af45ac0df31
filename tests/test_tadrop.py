"""TADrop allocator (streammerge's §10.3 rule). Expected values are worked out by hand or from
independent formulas (closed-form moments, numpy re-derivations), never read back from the code.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import numpy as np
import pytest
import torch

from streammerge.tadrop import (
    Allocation,
    TadropConfig,
    allocate,
    chunk_sample_slice,
    kurtosis,
    nm_from_density,
    sample,
    sample_positions,
)

# ---------------------------------------------------------------------------------------------
# config


def test_config_defaults_resolve_bounds():
    cfg = TadropConfig(density=0.5)
    assert (cfg.alpha, cfg.max_sample) == (0.5, 2**20)
    assert (cfg.lo, cfg.hi) == (0.125, 1.0)
    cfg = TadropConfig(density=0.1)
    assert cfg.lo == pytest.approx(0.025) and cfg.hi == pytest.approx(0.4)
    cfg = TadropConfig(density=0.3, d_min=0.0, d_max=0.3)
    assert (cfg.lo, cfg.hi) == (0.0, 0.3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 0.0},
        {"density": -0.1},
        {"density": 1.5},
        {"density": math.nan},
        {"density": 0.5, "alpha": -0.1},
        {"density": 0.5, "alpha": math.inf},
        {"density": 0.5, "alpha": math.nan},
        {"density": 0.5, "d_min": 0.6},
        {"density": 0.5, "d_min": -0.1},
        {"density": 0.5, "d_max": 0.4},
        {"density": 0.5, "d_max": 1.1},
        {"density": 0.9, "d_min": 0.1, "d_max": 0.8},
        {"density": 0.5, "max_sample": 0},
        {"density": 0.5, "max_sample": 1.5},
    ],
)
def test_config_rejects_invalid(kwargs):
    with pytest.raises(ValueError):
        TadropConfig(**kwargs)


def test_config_is_frozen():
    cfg = TadropConfig(density=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.density = 0.2  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# sampling


def test_sample_positions_small_tensor_means_all():
    assert sample_positions(0, 4) == (0, 1, 0)
    assert sample_positions(7, 7) == (0, 1, 7)
    assert sample_positions(5, 2**20) == (0, 1, 5)


@pytest.mark.parametrize(
    ("numel", "max_sample", "expected"),
    [
        # ceil(10/4) = 3 (odd); ceil(10/3) = 4 positions spanning 0..9 exactly: 0, 3, 6, 9.
        (10, 4, (0, 3, 4)),
        # 12: step 3, 4 positions span 10 elements, 2 left over, 1 on each side: 1, 4, 7, 10.
        (12, 4, (1, 3, 4)),
        # 13: ceil(13/4) = 4 -> odd 5; ceil(13/5) = 3 positions span 11; start 1: 1, 6, 11.
        (13, 4, (1, 5, 3)),
        # 2**24 / 2**20 = 16 -> 17; ceil(2**24 / 17) = 986896; span 986895*17 + 1 = 2**24.
        (2**24, 2**20, (0, 17, 986896)),
    ],
)
def test_sample_positions_by_hand(numel, max_sample, expected):
    assert sample_positions(numel, max_sample) == expected


def test_sample_positions_even_coverage_sweep():
    for numel in [*range(1, 300), 1000, 4097, 65536, 10**6 + 3]:
        for max_sample in (1, 2, 3, 7, 64, 100, 1000):
            start, step, count = sample_positions(numel, max_sample)
            if numel <= max_sample:
                assert (start, step, count) == (0, 1, numel)
                continue
            last = start + (count - 1) * step
            assert 1 <= count <= max_sample
            assert step % 2 == 1 and step * max_sample >= numel
            assert 0 <= start < step and last < numel
            # evenly spread: the gaps before the first and after the last are both < step
            assert numel - 1 - last < step
            # and the two end gaps differ by at most one (centred)
            assert abs((numel - 1 - last) - start) <= 1


def test_odd_step_visits_every_column_of_a_power_of_two_matrix():
    # 64 x 64 with 256 samples: ceil(4096/256) = 16 would only ever see columns 0, 16, 32, 48.
    start, step, count = sample_positions(64 * 64, 256)
    cols = {(start + i * step) % 64 for i in range(count)}
    assert cols == set(range(64))


def test_sample_is_a_view_with_the_right_elements():
    flat = torch.arange(1000, dtype=torch.float32)
    s = sample(flat, 64)
    start, step, count = sample_positions(1000, 64)
    assert torch.equal(s, flat[torch.arange(count) * step + start])
    assert s.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert sample(flat, 5000).numel() == 1000
    assert sample(flat[:0], 4).numel() == 0
    with pytest.raises(ValueError):
        sample(flat.view(10, 100), 64)


def test_chunked_sample_equals_whole_sample():
    rng = random.Random(0)
    for _ in range(200):
        numel = rng.randint(0, 5000)
        max_sample = rng.randint(1, 600)
        flat = torch.arange(numel)
        cuts = sorted({0, numel, *(rng.randint(0, numel) for _ in range(rng.randint(0, 6)))})
        parts = [
            flat[a:b][chunk_sample_slice(a, b - a, numel, max_sample)]
            for a, b in itertools.pairwise(cuts)
        ]
        got = torch.cat(parts) if parts else flat[:0]
        assert torch.equal(got, sample(flat, max_sample))


# ---------------------------------------------------------------------------------------------
# kurtosis


def test_kurtosis_hand_computed():
    # [0,0,0,4]: mu 1, deviations (-1,-1,-1,3): m2 = 12/4 = 3, m4 = (1+1+1+81)/4 = 21 -> 21/9.
    assert kurtosis(torch.tensor([0.0, 0.0, 0.0, 4.0])) == 7 / 3
    # [1,2,3,4]: deviations +-0.5, +-1.5: m2 = 1.25, m4 = (2*0.0625 + 2*5.0625)/4 = 2.5625.
    assert kurtosis(torch.tensor([1.0, 2.0, 3.0, 4.0])) == 2.5625 / 1.25**2
    # shape and dtype do not matter: the same values as a 2x2 bf16 tensor
    assert kurtosis(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)) == 1.64


def test_kurtosis_two_point_is_exactly_one():
    g = torch.Generator().manual_seed(1)
    x = torch.ones(2**20)
    x[: 2**19] = -1
    x = x[torch.randperm(2**20, generator=g)]
    assert kurtosis(x) == 1.0


def test_kurtosis_of_known_distributions():
    g = torch.Generator().manual_seed(2)
    # normal: 3, sampling s.d. sqrt(24/n) ~ 0.005
    assert kurtosis(torch.randn(2**20, generator=g)) == pytest.approx(3.0, abs=0.03)
    # Laplace via inverse CDF: 6, sampling s.d. ~ sqrt((8!/16 - 36)/n) ~ 0.05
    p = torch.rand(2**20, generator=g, dtype=torch.float64) - 0.5
    lap = -torch.sign(p) * torch.log1p(-2 * p.abs())
    assert kurtosis(lap) == pytest.approx(6.0, abs=0.3)
    # uniform: E x^4 / (E x^2)^2 = (1/80) / (1/12)^2 = 9/5
    assert kurtosis(torch.rand(2**20, generator=g)) == pytest.approx(1.8, abs=0.01)


def test_kurtosis_degenerate_inputs():
    assert kurtosis(torch.empty(0)) is None
    assert kurtosis(torch.zeros(10)) is None
    # 0.1 has no exact mean in float64 sums; must still count as zero variance
    assert kurtosis(torch.full((1001,), 0.1, dtype=torch.float64)) is None
    assert kurtosis(torch.tensor([5.0])) is None
    with pytest.raises(ValueError):
        kurtosis(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError):
        kurtosis(torch.tensor([1.0, math.inf]))


def test_kurtosis_scale_invariant_and_safe_for_tiny_or_huge_values():
    x = torch.tensor([0.0, 0.0, 0.0, 4.0], dtype=torch.float64)
    for s in (1e-200, 1e-300, 1e150, 1e300):
        assert kurtosis(x * s) == pytest.approx(7 / 3, rel=1e-14)


def test_kurtosis_does_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2**20 + 17, generator=g, dtype=torch.float64) * 1e3 + 1e6
    old = torch.get_num_threads()
    try:
        values = set()
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            values.add(kurtosis(x))
    finally:
        torch.set_num_threads(old)
    assert len(values) == 1


# ---------------------------------------------------------------------------------------------
# allocate


def test_allocate_symmetric_pair_by_hand():
    # u = 1, 3 on equal sizes: u_bar 2, sigma 1, z = -1, +1. d = 0.25 e^{-+0.5} (inside
    # [0.0625, 1]); budget c * 0.25 (e^-.5 + e^.5) / 2 = 0.25 gives c = 1 / cosh(0.5).
    a = allocate([100, 100], [math.e, math.e**3], TadropConfig(density=0.25))
    c = 1 / math.cosh(0.5)
    assert a.scale == pytest.approx(c, rel=1e-12)
    assert a.densities[0] == pytest.approx(0.25 * math.exp(-0.5) * c, rel=1e-12)
    assert a.densities[1] == pytest.approx(0.25 * math.exp(0.5) * c, rel=1e-12)
    assert a.achieved == pytest.approx(0.25, abs=1e-12)


def test_allocate_parameter_count_weighted_standardisation_by_hand():
    # numel 1 and 3, u = 0 and 4: u_bar = 12/4 = 3, var = (1*9 + 3*1)/4 = 3, z = -sqrt3, 1/sqrt3.
    d0 = 0.5 * math.exp(-0.5 * math.sqrt(3))  # 0.2103, inside [0.125, 1]
    d1 = 0.5 * math.exp(0.5 / math.sqrt(3))  # 0.6674
    c = 2.0 / (d0 + 3 * d1)  # budget: c (1*d0 + 3*d1) = 0.5 * 4; c*d0 = 0.19 > lo, c*d1 < 1
    a = allocate([1, 3], [1.0, math.exp(4)], TadropConfig(density=0.5))
    assert a.densities == pytest.approx((c * d0, c * d1), rel=1e-12)
    assert a.scale == pytest.approx(c, rel=1e-12)


def test_allocate_with_clipping_by_hand():
    # alpha 10, z = -1, +1: raw 0.5 e^-10 -> lo 0.125, 0.5 e^10 -> hi 1. For c < 1 the first stays
    # at lo, so 0.125 + c = 2 * 0.5 gives c = 0.875 and densities (0.125, 0.875).
    a = allocate([7, 7], [2.0, 5.0], TadropConfig(density=0.5, alpha=10.0))
    assert a.densities == pytest.approx((0.125, 0.875), abs=1e-12)
    assert a.scale == pytest.approx(0.875, rel=1e-12)


def _random_case(rng: random.Random, n: int, with_none: bool):
    numels = [int(10 ** rng.uniform(0, 7)) for _ in range(n)]
    kappas = [
        None if with_none and rng.random() < 0.1 else 10 ** rng.uniform(0, 2) for _ in range(n)
    ]
    return numels, kappas


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 2.0, 5.0])
def test_allocate_budget_and_bounds(density, alpha):
    rng = random.Random(int(density * 1000) * 31 + int(alpha * 10))
    for trial in range(20):
        numels, kappas = _random_case(rng, rng.randint(1, 60), with_none=trial % 2 == 1)
        cfg = TadropConfig(density=density, alpha=alpha)
        a = allocate(numels, kappas, cfg)
        assert isinstance(a, Allocation) and len(a.densities) == len(numels)
        achieved = sum(n * d for n, d in zip(numels, a.densities, strict=True)) / sum(numels)
        assert abs(achieved - density) <= 1e-3  # the spec's requirement
        assert abs(achieved - density) <= 1e-9  # what the bisection actually delivers
        assert a.achieved == pytest.approx(achieved, abs=1e-12)
        assert all(cfg.lo <= d <= cfg.hi for d in a.densities)
        for k, d in zip(kappas, a.densities, strict=True):
            if k is None:
                assert d == density


def test_allocate_budget_with_user_bounds():
    rng = random.Random(5)
    for density, lo, hi in [(0.3, 0.0, 1.0), (0.3, 0.29, 0.31), (0.05, 0.01, 0.5)]:
        cfg = TadropConfig(density=density, alpha=1.5, d_min=lo, d_max=hi)
        numels, kappas = _random_case(rng, 40, with_none=True)
        a = allocate(numels, kappas, cfg)
        achieved = sum(n * d for n, d in zip(numels, a.densities, strict=True)) / sum(numels)
        assert abs(achieved - density) <= 1e-9
        assert all(lo <= d <= hi for d in a.densities)


def test_allocate_matches_independent_numpy_derivation():
    rng = random.Random(6)
    numels, kappas = _random_case(rng, 50, with_none=False)
    cfg = TadropConfig(density=0.2, alpha=0.8)
    a = allocate(numels, kappas, cfg)
    w = np.array(numels, dtype=np.float64)
    u = np.log(np.array(kappas))
    mean = np.average(u, weights=w)
    z = (u - mean) / math.sqrt(np.average((u - mean) ** 2, weights=w))
    raw = np.clip(0.2 * np.exp(0.8 * z), cfg.lo, cfg.hi)
    assert np.allclose(a.densities, np.clip(a.scale * raw, cfg.lo, cfg.hi), rtol=1e-12, atol=0)


def test_allocate_monotone_in_kappa():
    rng = random.Random(7)
    for trial in range(50):
        n = rng.randint(2, 40)
        kappas = [10 ** rng.uniform(0, 2) for _ in range(n)]
        # equal sizes (the spec's property) and, since z is one increasing map, also mixed sizes
        numels = [4096] * n if trial % 2 == 0 else _random_case(rng, n, with_none=False)[0]
        cfg = TadropConfig(density=rng.choice([0.1, 0.25, 0.5, 0.9]), alpha=rng.uniform(0, 3))
        d = allocate(numels, kappas, cfg).densities
        order = sorted(range(n), key=kappas.__getitem__)
        assert all(d[i] <= d[j] for i, j in itertools.pairwise(order))
    # and strictly: a heavier tail is preserved more when nothing clips
    d = allocate([10, 10, 10], [3.0, 6.0, 30.0], TadropConfig(density=0.3)).densities
    assert d[0] < d[1] < d[2]


def test_zero_variance_tensors_get_base_density_and_do_not_move_the_others():
    cfg = TadropConfig(density=0.25)
    numels, kappas = [100, 200, 300], [2.0, 3.0, 9.0]
    base = allocate(numels, kappas, cfg)
    with_none = allocate([*numels, 5000, 1], [*kappas, None, None], cfg)
    assert with_none.densities[3:] == (0.25, 0.25)
    # excluded from the standardisation and counted at d_bar: the active set's equation is unchanged
    assert with_none.densities[:3] == base.densities
    assert with_none.achieved == pytest.approx(0.25, abs=1e-12)
    # all zero-variance, and numel-0 tensors, likewise
    assert allocate([3, 4], [None, None], cfg).densities == (0.25, 0.25)
    assert allocate([0, 5, 5], [7.0, 2.0, 2.0], cfg).densities[0] == 0.25


def test_equal_kappas_or_alpha_zero_give_base_density_exactly():
    numels = [1, 17, 4096, 10**7]
    a = allocate(numels, [3.0] * 4, TadropConfig(density=0.37))
    assert a.densities == (0.37,) * 4 and a.scale == 1.0
    a = allocate(numels, [1.5, 3.0, 40.0, 2.0], TadropConfig(density=0.37, alpha=0.0))
    assert a.densities == (0.37,) * 4 and a.scale == 1.0


def test_forced_bounds_give_base_density_exactly():
    # d_bar = hi (d_bar = 1 with default bounds) or d_bar = lo: every density must equal d_bar
    numels, kappas = [10, 20, 30], [2.0, 5.0, 50.0]
    assert allocate(numels, kappas, TadropConfig(density=1.0)).densities == (1.0,) * 3
    cfg = TadropConfig(density=0.2, d_min=0.2)
    assert allocate(numels, kappas, cfg).densities == (0.2,) * 3


def test_allocate_deterministic_and_permutation_equivariant():
    rng = random.Random(8)
    numels, kappas = _random_case(rng, 80, with_none=True)
    cfg = TadropConfig(density=0.25, alpha=1.2)
    a, b = allocate(numels, kappas, cfg), allocate(list(numels), list(kappas), cfg)
    assert a == b
    perm = list(range(80))
    rng.shuffle(perm)
    p = allocate([numels[i] for i in perm], [kappas[i] for i in perm], cfg)
    assert p.densities == tuple(a.densities[i] for i in perm)
    assert p.scale == a.scale


def test_unattainable_budget_returns_closest():
    # d_min = 0 and alpha 2000: z = (-1/sqrt2, -1/sqrt2, sqrt2) (u = 0, 0, 1 on equal sizes), so
    # raw densities underflow to 0, 0 and saturate at 1. Best average reachable is 1/3 < 0.5.
    cfg = TadropConfig(density=0.5, alpha=2000.0, d_min=0.0, d_max=1.0)
    a = allocate([5, 5, 5], [1.0, 1.0, math.e], cfg)
    assert a.densities == (0.0, 0.0, 1.0)
    assert a.achieved == pytest.approx(1 / 3, abs=1e-15)


def test_extreme_z_for_tiny_tensors_does_not_overflow():
    # weighted z of a 1-element tensor next to 1e10 elements is ~ 1e5; exp must not overflow
    cfg = TadropConfig(density=0.1)
    a = allocate([1, 10**10], [100.0, 3.0], cfg)
    assert a.densities[0] == cfg.hi
    assert a.achieved == pytest.approx(0.1, abs=1e-9)
    a = allocate([1, 10**10], [1.0, 3.0], cfg)
    assert a.densities[0] == cfg.lo


def test_allocate_input_validation():
    cfg = TadropConfig(density=0.5)
    assert allocate([], [], cfg) == Allocation(densities=(), achieved=0.5, scale=1.0)
    with pytest.raises(ValueError):
        allocate([1, 2], [3.0], cfg)
    with pytest.raises(ValueError):
        allocate([-1], [3.0], cfg)
    for bad in (math.nan, math.inf, 0.0, -2.0):
        with pytest.raises(ValueError):
            allocate([4], [bad], cfg)


# ---------------------------------------------------------------------------------------------
# n:m


@pytest.mark.parametrize(
    ("d", "m", "n"),
    [
        (0.5, 4, 2),
        (0.25, 4, 1),
        (0.625, 4, 3),  # 2.5 rounds half up to 3 (Python's round would give 2)
        (0.375, 4, 2),  # 1.5 -> 2
        (0.125, 4, 1),  # 0.5 -> 1
        (0.1, 4, 1),  # 0.4 -> 0, clamped to 1
        (0.0, 4, 1),  # keep at least one per block
        (0.9, 4, 4),  # 3.6 -> 4
        (1.0, 4, 4),
        (0.1, 16, 2),  # 1.6 -> 2
        (0.3, 1, 1),
        (0.8, 32, 26),  # 25.6 -> 26
    ],
)
def test_nm_from_density(d, m, n):
    assert nm_from_density(d, m) == n


@pytest.mark.parametrize(("d", "m"), [(-0.1, 4), (1.1, 4), (math.nan, 4), (0.5, 0), (0.5, 2.0)])
def test_nm_from_density_rejects_invalid(d, m):
    with pytest.raises(ValueError):
        nm_from_density(d, m)
