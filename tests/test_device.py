"""Device selection, and (where a GPU is present) a GPU merge equal to the CPU merge."""

from __future__ import annotations

import pytest
import torch
from test_cli import assert_user_error, fast, run, write_recipe
from test_streaming_equals_reference import load_output, recipe_for, same_bytes

from streammerge import run_merge
from streammerge.device import resolve_device
from streammerge.errors import StreamMergeError

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
