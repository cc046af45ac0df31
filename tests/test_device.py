"""Device selection, and (where a GPU is present) a GPU merge equal to the CPU merge."""

from __future__ import annotations

import pytest
import torch
from test_cli import assert_user_error, fast, run, write_recipe
from test_streaming_equals_reference import load_output, recipe_for, same_bytes

import streammerge.device as device_mod
import streammerge.engine as engine
from streammerge import run_merge
from streammerge.device import DeviceStager, mps_available, resolve_device
from streammerge.errors import StreamMergeError
from streammerge.methods import kernels

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")
def test_cuda_asked_for_without_a_gpu_is_a_clear_error(tmp_path, family):
    recipe = write_recipe(tmp_path / "recipe.yaml", *family)
    r = run("run", recipe, tmp_path / "out", "--device", "cuda", *fast())
    assert_user_error(r.stderr, r.exit_code, "--device cuda", "--device cpu")
    assert not (tmp_path / "out").exists()  # refused before anything is created


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_auto_falls_back_to_the_cpu():
    assert resolve_device("auto", "cabs").type == "cpu"
    assert resolve_device("cpu", "ties").type == "cpu"


def test_unknown_device_is_refused():
    with pytest.raises(StreamMergeError, match="--device must be one of"):
        resolve_device("tpu", "cabs")


@needs_cuda
def test_cpu_only_method_on_cuda_is_refused():
    with pytest.raises(StreamMergeError, match="CPU only"):
        resolve_device("cuda", "dare_ties")


@needs_cuda
@pytest.mark.parametrize("method", ["cabs", "task_arithmetic", "linear"])
@pytest.mark.parametrize("chunk", [40, 1000])
def test_gpu_merge_equals_cpu_merge(tmp_path, family, method, chunk):
    base, fts = family
    extra = {"n_val": 2, "m_val": 4} if method == "cabs" else {}
    recipe = recipe_for(base, fts, method, **extra)
    outs = {}
    for device in ("cpu", "cuda"):
        run_merge(recipe, tmp_path / device, chunk_elems=chunk, max_memory=2**30, device=device)
        outs[device] = load_output(tmp_path / device)
    for name, t in outs["cpu"].items():
        assert same_bytes(outs["cuda"][name], t), name


needs_mps = pytest.mark.skipif(not mps_available(), reason="no Metal GPU (MPS)")


@pytest.mark.skipif(mps_available(), reason="checks the no-MPS errors")
def test_mps_asked_for_without_a_metal_gpu_is_a_clear_error(tmp_path, family):
    recipe = write_recipe(tmp_path / "recipe.yaml", *family)
    r = run("run", recipe, tmp_path / "out", "--device", "mps", *fast())
    assert_user_error(r.stderr, r.exit_code, "--device mps", "Metal", "--device cpu")
    assert not (tmp_path / "out").exists()


def test_auto_picks_mps_for_methods_that_run_there(monkeypatch):
    monkeypatch.setattr(device_mod.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "mps_available", lambda: True)
    assert resolve_device("auto", "cabs").type == "mps"
    assert resolve_device("auto", "karcher").type == "cpu"  # float64 statistics
    with pytest.raises(StreamMergeError, match=r"does not run on the Metal GPU.*cabs"):
        resolve_device("mps", "ties")


@pytest.mark.parametrize("method", ["cabs", "task_arithmetic", "linear"])
def test_the_mps_path_writes_the_cpu_bytes(tmp_path, family, method, monkeypatch):
    """What ``--device mps`` runs, on the CPU: the synchronous stager and the methods' torch
    path (numba's CPU kernels off), against an ordinary CPU run."""
    base, fts = family
    extra = {"n_val": 2, "m_val": 4} if method == "cabs" else {}
    recipe = recipe_for(base, fts, method, **extra)
    run_merge(recipe, tmp_path / "cpu", chunk_elems=40, max_memory=2**30)
    init = engine.Scheduler.__init__

    def staged(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        self.stager = DeviceStager(torch.device("cpu"))

    monkeypatch.setattr(engine.Scheduler, "__init__", staged)
    monkeypatch.setattr(kernels, "HAVE_NUMBA", False)
    run_merge(recipe, tmp_path / "staged", chunk_elems=40, max_memory=2**30)
    want, got = load_output(tmp_path / "cpu"), load_output(tmp_path / "staged")
    assert want.keys() == got.keys()
    for name, t in want.items():
        assert same_bytes(got[name], t), name


@needs_mps
@pytest.mark.parametrize("method", ["cabs", "task_arithmetic", "linear"])
def test_mps_merge_equals_cpu_merge(tmp_path, family, method):
    base, fts = family
    extra = {"n_val": 2, "m_val": 4} if method == "cabs" else {}
    recipe = recipe_for(base, fts, method, **extra)
    outs = {}
    for device in ("cpu", "mps"):
        run_merge(recipe, tmp_path / device, chunk_elems=40, max_memory=2**30, device=device)
        outs[device] = load_output(tmp_path / device)
    for name, t in outs["cpu"].items():
        assert same_bytes(outs["mps"][name], t), name
