"""Peak RSS stays inside --max-memory even when single tensors are larger than the budget.

The family's inputs (3 x 308 MB) do not fit the 800 MiB budget, and its embedding and lm_head
hold 65.5 M elements each: merging either as a whole tensor in fp32 (base, accumulator, task
vector and selection keys: 16 bytes per element) would alone exceed the budget, so only a
chunked, page-releasing engine passes. (The budget counts everything in RSS, including the
~250 MiB of library pages a freshly installed torch maps.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from childproc import run_measured

from streammerge.synth import LlamaShape, generate_family

BUDGET_MIB = 800
SHAPE = LlamaShape(hidden=1024, intermediate=2816, layers=2, heads=8, kv_heads=4, vocab=64000)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return generate_family(tmp_path_factory.mktemp("mem"), SHAPE, n_finetunes=2, seed=3)


@pytest.mark.parametrize("method", ["task_arithmetic", "cabs"])
def test_peak_rss_below_budget(tmp_path, family, method):
    base, fts = family
    extra = "parameters: {n_val: 16, m_val: 64}\n" if method == "cabs" else ""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5}}\n" for f in fts)
        + extra
    )
    inputs = sum(p.stat().st_size for d in (base, *fts) for p in d.glob("*.safetensors"))
    assert inputs > BUDGET_MIB * 2**20
    assert SHAPE.vocab * SHAPE.hidden * 16 > BUDGET_MIB * 2**20
    rc, _, err, peak = run_measured(
        [
            "run",
            str(recipe),
            str(tmp_path / "out"),
            "--max-memory",
            f"{BUDGET_MIB}MiB",
            "--no-progress",
        ]
    )
    assert rc == 0, err
    assert peak < BUDGET_MIB, f"peak RSS {peak:.0f} MiB over the {BUDGET_MIB} MiB budget"
