"""A method defined here, in the test file alone, runs end to end through the CLI: ``plan``,
``run``, resume after SIGKILL, the model card, and its own parameter errors. Nothing outside
``methods/`` knows its name; the registry and its spec are all it takes.

The toy: ``out = base + alpha * sum_k gain_k * tau_k / max(1, M)`` where ``M`` is the largest
``|tau|`` of any model in the whole tensor, found by a statistics pass (max is exact, so any
chunking gives the same bytes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_family
from test_streaming_equals_reference import load_output, same_bytes

from streammerge.methods import METHODS, register
from streammerge.methods.base import MergeResult, MethodBase, MethodOptions, ModelParams, TensorId
from streammerge.methods.spec import CardColumn, MethodSpec, Param
from streammerge.recipe import load_recipe
from streammerge.reference import reference_merge

SPEC = MethodSpec(
    name="toy_scaled_sum",
    summary="a test's toy: gains on the task vectors, scaled by the largest |tau|",
    params=(
        Param("gain", default=1.0, low=-10.0, high=10.0),
        Param("alpha", per_model=False, required=True, low=0.0, high=1.0),
    ),
    stats=("max |tau| over every model (exact)",),
    card=(CardColumn("gain", lambda p, o: f"{p.get('gain'):g}"),),
    example={"alpha": 0.5},
)
SLEEP_ENV = "TOY_SLEEP_S"
"""Seconds to sleep per merged chunk, so a kill lands mid-run."""


@dataclass
class _State:
    params: Sequence[ModelParams]
    options: MethodOptions
    dtype: torch.dtype
    peak: float = 0.0


def _scaled(base: torch.Tensor, fts: Sequence[torch.Tensor], st: _State) -> torch.Tensor:
    b = base.to(st.dtype)
    acc = torch.zeros_like(b)
    for ft, p in zip(fts, st.params, strict=True):
        acc += float(p.get("gain")) * (ft.to(st.dtype) - b)  # type: ignore[arg-type]
    return b + float(st.options.get("alpha")) * acc / max(1.0, st.peak)  # type: ignore[arg-type]


class Toy(MethodBase):
    spec = SPEC

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return 8

    def work_bytes(self, k: int, itemsize: int) -> int:
        return 4 * itemsize

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return 4 * itemsize

    def stats_passes(self, params, options, dtype, shape=()) -> int:
        return 1

    def chunk_local(self, params, options) -> bool:
        return True

    def new_state(self, tensor, params, options, dtype) -> _State:
        return _State(params, options, dtype)

    def accumulate(self, state: _State, pass_index, start, base, fts) -> None:
        for ft in fts:
            tau = ft.to(state.dtype) - base.to(state.dtype)
            state.peak = max(state.peak, float(tau.abs().max()) if tau.numel() else 0.0)

    def end_pass(self, state, pass_index) -> None:
        pass

    def merge(self, state: _State, start, base, fts) -> MergeResult:
        time.sleep(float(os.environ.get(SLEEP_ENV, "0")))
        return MergeResult(_scaled(base.flatten(), fts, state), None)

    def reference(self, tensor: TensorId, base, fts, params, options, dtype) -> MergeResult:
        st = _State(params, options, dtype)
        st.peak = max((float((f.to(dtype) - base.to(dtype)).abs().max()) for f in fts),
                      default=0.0)  # fmt: skip
        return MergeResult(_scaled(base.flatten(), [f.flatten() for f in fts], st), None)


def ensure_registered() -> None:
    if SPEC.name not in METHODS:
        register(Toy())


LAUNCHER = (
    "import sys; sys.path.insert(0, {tests!r}); import test_toy_method as t; "
    "t.ensure_registered(); from streammerge.cli import main; "
    "sys.argv = ['streammerge', *sys.argv[1:]]; main()"
)


def cli(*args: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    code = LAUNCHER.format(tests=str(Path(__file__).parent))
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


@pytest.fixture
def toy() -> Iterator[None]:
    added = SPEC.name not in METHODS
    ensure_registered()
    yield
    if added:
        METHODS.pop(SPEC.name)


def write_recipe(path: Path, base: Path, fts: list[Path], alpha: object = 0.5) -> Path:
    path.write_text(
        f"merge_method: {SPEC.name}\nbase_model: {base}\nmodels:\n"
        f"  - model: {fts[0]}\n    parameters: {{gain: 1.5}}\n"
        f"  - model: {fts[1]}\n    parameters: {{gain: -0.5}}\n"
        f"parameters: {{alpha: {alpha}}}\ndtype: float32\n"
    )
    return path


def test_toy_method_end_to_end_through_the_cli(toy, tmp_path: Path) -> None:
    base, fts = make_family(tmp_path / "m", k=2)
    recipe = write_recipe(tmp_path / "toy.yaml", base, fts)

    code, out, err = finish(cli("plan", recipe, tmp_path / "out", "--no-calibrate"))
    assert code == 0, err
    assert f"plan: {SPEC.name} merge of 2 model(s)" in out
    assert "statistics pass: max |tau| over every model (exact)" in out

    whole = tmp_path / "whole"
    code, _, err = finish(cli("run", recipe, whole, "--chunk-elems", "8", "--no-progress"))
    assert code == 0, err
    got = load_output(whole)
    for name, expected, masks in reference_merge(load_recipe(recipe)):
        assert same_bytes(got[name], expected), name
        assert masks is None
    card = (whole / "README.md").read_text()
    assert f"`{SPEC.name}` method" in card
    assert "| # | model | gain |" in card and "| 1.5 |" in card and "| -0.5 |" in card

    # SIGKILL mid-run, then the same command resumes to the same bytes
    cut = tmp_path / "cut"
    args = ("run", recipe, cut, "--chunk-elems", "8", "--no-progress")
    p = cli(*args, env={SLEEP_ENV: "0.02"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (cut / ".streammerge" / "journal.jsonl").exists():
        time.sleep(0.05)
    time.sleep(1.5)  # some chunks journaled, most not
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (cut / "INCOMPLETE").exists() and not (cut / "streammerge.json").exists()
    code, out, err = finish(cli(*args))
    assert code == 0, err
    for f in sorted(whole.glob("model-*.safetensors")):
        assert f.read_bytes() == (cut / f.name).read_bytes(), f.name
    assert not (cut / "INCOMPLETE").exists()


def test_toy_method_parameters_are_checked_from_its_spec(toy, tmp_path: Path) -> None:
    base, fts = make_family(tmp_path / "m", k=2)
    for alpha, fragment in ((2, "'alpha' must be between 0 and 1"), ("[0.1, 0.2]", None)):
        recipe = write_recipe(tmp_path / "toy.yaml", base, fts, alpha)
        code, _, err = finish(cli("run", recipe, tmp_path / "out", "--no-progress"))
        if fragment is None:  # a gradient is fine for a float parameter
            assert code == 0, err
            continue
        assert code == 2 and err.startswith("error: ") and fragment in err, err
        assert "Traceback" not in err
    missing = tmp_path / "missing.yaml"
    missing.write_text(write_recipe(tmp_path / "x.yaml", base, fts).read_text().replace(
        "parameters: {alpha: 0.5}\n", ""))  # fmt: skip
    code, _, err = finish(cli("run", missing, tmp_path / "out2", "--no-progress"))
    assert code == 2 and "needs a 'alpha'" in err, err
