"""Mask stores: one contract run against every implementation, plus the zarr layout on disk."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import SHAPES, make_family

from streammerge import StreamMergeError, read_mask, run_merge
from streammerge.mask_store import MemoryMaskStore, ZarrMaskStore

# (shape, chunk_elems): numel not a multiple of 8, of the chunk, or smaller than one chunk
AWKWARD = [((7, 13), 16), ((1001,), 64), ((37, 24), 96), ((5,), 8), ((3,), 64), ((), 8)]


def random_mask(numel: int, seed: int) -> torch.Tensor:
    return torch.rand(numel, generator=torch.Generator().manual_seed(seed)) < 0.4


def chunk_starts(numel: int, chunk: int, seed: int) -> list[int]:
    starts = list(range(0, numel, chunk))
    random.Random(seed).shuffle(starts)
    return starts


class MaskStoreContract:
    """What every MaskStore must do; subclasses provide the ``store`` fixture."""

    @pytest.fixture
    def store(self, tmp_path):
        raise NotImplementedError

    @pytest.mark.parametrize(("shape", "chunk"), AWKWARD)
    def test_round_trip_in_any_chunk_order(self, store, shape, chunk):
        numel = math.prod(shape)
        flat = random_mask(numel, seed=numel)
        store.create(0, "model.layers.0.mlp.up_proj.weight", shape, chunk)
        for s in chunk_starts(numel, chunk, seed=chunk):
            store.write(0, "model.layers.0.mlp.up_proj.weight", s, flat[s : s + chunk])
        got = store.read(0, "model.layers.0.mlp.up_proj.weight")
        assert got.dtype == torch.bool and tuple(got.shape) == shape
        assert torch.equal(got.reshape(-1), flat)

    def test_unwritten_chunks_read_as_false(self, store):
        store.create(1, "w", (10, 10), 24)
        ones = torch.ones(24, dtype=torch.bool)
        store.write(1, "w", 24, ones)
        store.write(1, "w", 96, ones[:4])  # the short last chunk
        expected = torch.zeros(100, dtype=torch.bool)
        expected[24:48] = True
        expected[96:] = True
        assert torch.equal(store.read(1, "w").reshape(-1), expected)
        store.create(1, "untouched", (9,), 8)
        assert not store.read(1, "untouched").any()

    def test_models_and_tensors_are_independent(self, store):
        for k in range(3):
            for name in ("a.weight", "b.weight"):
                store.create(k, name, (20,), 8)
        store.write(2, "b.weight", 8, torch.ones(8, dtype=torch.bool))
        for k in range(3):
            for name in ("a.weight", "b.weight"):
                assert store.read(k, name).sum() == (8 if (k, name) == (2, "b.weight") else 0)

    def test_attrs_round_trip(self, store):
        attrs = {
            "method": "cabs",
            "models": [{"name": "ft1", "path": "/m/ft1", "weight": 0.5, "n": 2, "m": 4}],
            "order": ["ft1"],
            "options": {"tail_policy": "zero"},
        }
        store.set_attrs(attrs)
        assert store.attrs() == attrs

    @pytest.mark.parametrize("chunk", [7, 12, 100])
    def test_chunk_not_a_multiple_of_8_is_refused(self, store, chunk):
        with pytest.raises(ValueError):
            store.create(0, "w", (64,), chunk)


class TestZarrMaskStore(MaskStoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        return ZarrMaskStore(tmp_path / "occupancy.zarr", mode="w")


class TestZarrMaskStoreReopened(MaskStoreContract):
    """Every write goes through a sync, seal and a fresh reader before it is read back."""

    @pytest.fixture
    def store(self, tmp_path):
        return Reopening(tmp_path / "occupancy.zarr")


class Reopening(ZarrMaskStore):
    def __init__(self, path):
        super().__init__(path, mode="w")

    def read(self, model, tensor):
        self.seal()
        return ZarrMaskStore(self.path).read(model, tensor)


class TestMemoryMaskStore(MaskStoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        return MemoryMaskStore()


# --------------------------------------------------------------------------------------------
# The zarr layout


def test_zarr_array_is_packed_bits(tmp_path):
    path = tmp_path / "occupancy.zarr"
    store = ZarrMaskStore(path, mode="w")
    store.create(0, "t", (5, 41), 64)  # 205 elements -> 26 bytes, chunks of 8 bytes
    mask = torch.zeros(205, dtype=torch.bool)
    mask[[0, 3, 9, 204]] = True
    for s in (192, 64, 0, 128):
        store.write(0, "t", s, mask[s : s + 64])
    arr = zarr.open_group(str(path), mode="r")["masks/0/t"]
    assert arr.dtype == np.uint8
    assert arr.shape == (26,) and arr.chunks == (8,)
    raw = np.asarray(arr[:])
    # MSB first: elements 0 and 3 -> 0b1001_0000; element 9 -> 0b0100_0000;
    # element 204 = 25 * 8 + 4 -> 0b0000_1000
    assert raw[0] == 0x90 and raw[1] == 0x40 and raw[25] == 0x08
    assert raw.sum() == 0x90 + 0x40 + 0x08


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A real CABS merge whose recipe names models by relative path."""
    root = tmp_path_factory.mktemp("merge")
    make_family(root / "models", k=2)
    recipe = {
        "merge_method": "cabs",
        "base_model": "models/base",
        "models": [
            {"model": "models/ft1", "parameters": {"weight": 1.0}},
            {"model": "models/ft2", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"n_val": 2, "m_val": 4},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_merge(root / "recipe.yaml", root / "out", max_memory=2**32, chunk_elems=64)
    return root


@pytest.mark.parametrize("tensor", ["embed.weight", "odd.weight", "scalar"])
def test_read_mask_after_a_merge(merged, tensor):
    out = merged / "out"
    by_index = [read_mask(out, k, tensor) for k in (0, 1)]
    assert torch.equal(read_mask(out, "models/ft1", tensor), by_index[0])  # as in the recipe
    assert torch.equal(read_mask(out, "ft2", tensor), by_index[1])  # folder name
    resolved = str((merged / "models" / "ft1").resolve())
    assert torch.equal(read_mask(str(out), resolved, tensor), by_index[0])
    for mask in by_index:
        assert mask.dtype == torch.bool and tuple(mask.shape) == SHAPES[tensor]
    # CABS strict, 2:4: disjoint masks, at most 2 kept per block of 4 consecutive elements
    a, b = (m.reshape(-1) for m in by_index)
    assert not (a & b).any()
    numel = a.numel()
    for m in (a, b):
        blocks = torch.nn.functional.pad(m, (0, -numel % 4)).reshape(-1, 4)
        assert blocks.sum(1).max() <= 2
    # the stored kept count agrees with the bits; zarr reads the sealed store as it is
    group = zarr.open_group(str(out / "occupancy.zarr"), mode="r")
    entry = group["masks"].attrs["tensors"][tensor]  # type: ignore[index]
    for k, mask in enumerate(by_index):
        assert entry["kept"][k] == int(mask.sum())
        packed = np.packbits(mask.reshape(-1).numpy())
        if entry["offset"] is None:
            raw = np.asarray(group[f"masks/{k}/{tensor}"][:])
        else:
            raw = np.asarray(group[f"masks/{k}/packed"][entry["offset"] :][: packed.size])
        assert np.array_equal(raw, packed)


def test_masks_are_not_empty(merged):
    assert read_mask(merged / "out", 0, "embed.weight").sum() > 0
    assert read_mask(merged / "out", 1, "embed.weight").sum() > 0


def test_read_mask_unknown_model_lists_the_models(merged):
    with pytest.raises(StreamMergeError) as e:
        read_mask(merged / "out", "ft9", "embed.weight")
    assert "'ft9'" in str(e.value)
    assert "models/ft1" in str(e.value) and "models/ft2" in str(e.value)
    with pytest.raises(StreamMergeError):
        read_mask(merged / "out", 2, "embed.weight")
    with pytest.raises(StreamMergeError, match=r"no\.weight"):
        read_mask(merged / "out", 0, "no.weight")


def test_read_mask_without_a_store(tmp_path):
    with pytest.raises(StreamMergeError):
        read_mask(tmp_path, 0, "embed.weight")


def test_small_tensors_share_packed_chunks(tmp_path):
    """A thousand small masks are a handful of files, written by one sync, and read back
    before and after the seal (and by a fresh reader)."""
    path = tmp_path / "occupancy.zarr"
    store = ZarrMaskStore(path, mode="w")
    masks = {}
    for i in range(1000):
        name = f"model.layers.{i}.experts.w"
        masks[name] = random_mask(700 + i, seed=i)
        for k in range(2):
            store.create(k, name, (700 + i,), 2048)
            store.write(k, name, 0, masks[name] if k else ~masks[name])
            store.finish(k, name, int(masks[name].sum()), {"weight": 1.0})
    assert torch.equal(store.read(1, "model.layers.3.experts.w"), masks["model.layers.3.experts.w"])
    store.sync()
    files = [p for p in path.rglob("*") if p.is_file()]
    assert len(files) < 20, files  # not one array per model and tensor
    store.seal()
    assert not (path / "masks" / "layout.jsonl").exists()
    again = ZarrMaskStore(path)
    for name, mask in masks.items():
        assert torch.equal(again.read(1, name), mask)
        assert torch.equal(again.read(0, name), ~mask)
        assert again.kept(1, name) == int(mask.sum())
    assert again.names() == list(masks)
    assert again.info(0, "model.layers.9.experts.w") == {
        "shape": [709],
        "numel": 709,
        "weight": 1.0,
        "kept": int(masks["model.layers.9.experts.w"].sum()),
    }


def test_an_interrupted_store_resumes_from_its_layout_log(tmp_path):
    """What was synced before a crash is there on resume; the layout continues in order, so
    the sealed store is the same bytes as one written without the interruption."""

    def fill(store, names):
        for i, name in enumerate(names):
            store.create(0, name, (100 + i,), 256)
            store.write(0, name, 0, random_mask(100 + i, seed=i))
            store.finish(0, name, i)

    names = [f"t{i}" for i in range(50)]
    whole = ZarrMaskStore(tmp_path / "whole.zarr", mode="w")
    fill(whole, names)
    whole.seal()
    cut = ZarrMaskStore(tmp_path / "cut.zarr", mode="w")
    fill(cut, names[:30])
    cut.sync()
    del cut  # a crash: never sealed
    resumed = ZarrMaskStore(tmp_path / "cut.zarr", mode="r+")
    assert resumed.kept(0, "t29") == 29
    fill(resumed, names)  # a resume redoes from the first unjournaled tensor on: same bytes
    resumed.seal()

    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file()}  # fmt: skip

    assert tree(tmp_path / "whole.zarr") == tree(tmp_path / "cut.zarr")


def test_format_1_store_is_read_and_not_resumed(tmp_path):
    """A store of an older streammerge (one array per model and tensor, attributes on each)
    still reads; resuming into it is refused with an error line."""
    path = tmp_path / "occupancy.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_group("masks")
    mask = random_mask(100, seed=1)
    arr = group.create_array("masks/0/w", shape=(13,), chunks=(13,), dtype="uint8",
                             attributes={"shape": [10, 10], "numel": 100, "kept": 7})  # fmt: skip
    arr[:] = np.packbits(mask.numpy())
    old = ZarrMaskStore(path)
    assert torch.equal(old.read(0, "w").reshape(-1), mask)
    assert torch.equal(old.read_range(0, "w", 8, 40), mask[8:40])
    assert old.kept(0, "w") == 7 and old.names() == ["w"]
    with pytest.raises(StreamMergeError, match=r"format 1.*--restart"):
        ZarrMaskStore(path, mode="r+")
