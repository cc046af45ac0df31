"""The safetensors reader and the positional shard writer, checked against the official library."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streammerge import InputError
from streammerge.model import ModelFolder, check_compatible
from streammerge.safetensors_io import (
    SafetensorsFile,
    ShardWriter,
    plan_shards,
    read_header,
    shard_layout,
    tensor_bytes,
)

ST_NAME = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int8: "I8",
}  # fmt: skip
SIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I8": 1}


def spec(name: str, t: torch.Tensor) -> tuple[str, str, tuple[int, ...]]:
    return name, ST_NAME[t.dtype], tuple(t.shape)


def nbytes(s: tuple[str, str, tuple[int, ...]]) -> int:
    n = SIZE[s[1]]
    for d in s[2]:
        n *= d
    return n


def write_planned(out_dir: Path, plan, tensors: dict[str, torch.Tensor], seed: int = 0) -> Path:
    """Fill a planned shard tensor by tensor, in a shuffled order."""
    writer = ShardWriter(out_dir, plan)
    order = [t.name for t in plan.tensors]
    random.Random(seed).shuffle(order)
    for name in order:
        writer.write(name, 0, tensor_bytes(tensors[name]))
    writer.finish()
    return out_dir / plan.filename


def raw_file(
    path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None
) -> Path:
    """A hand-made safetensors file: 8-byte length, header bytes, data."""
    js = header if isinstance(header, bytes) else json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    path.write_bytes(struct.pack("<Q", len(js) if length is None else length) + js + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# --------------------------------------------------------------------------------------------
# Writing: golden bytes


def golden_set(mixed_same_size: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "zeta.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "alpha": torch.randn(7, generator=g),
        "mid.bias": torch.randint(-100, 100, (9,), generator=g, dtype=torch.int8),
        "b.scalar": torch.tensor(1.25),
        "c.empty": torch.empty(0),
        "pos": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    if mixed_same_size:  # F16 next to BF16, I32 next to F32: same itemsize, different dtype
        tensors["m.half"] = torch.randn(2, 3, generator=g).to(torch.float16)
        tensors["a.int32"] = torch.arange(4, dtype=torch.int32)
    return tensors


@pytest.mark.parametrize(
    "mixed_same_size", [False, True], ids=["distinct-sizes", "mixed-same-size"]
)
def test_layout_and_writer_match_official_bytes(tmp_path, mixed_same_size):
    tensors = golden_set(mixed_same_size)
    save_file(tensors, tmp_path / "official.safetensors", metadata={"format": "pt"})
    plan = shard_layout([spec(n, t) for n, t in tensors.items()], "ours.safetensors")
    ours = write_planned(tmp_path, plan, tensors)
    assert ours.read_bytes() == (tmp_path / "official.safetensors").read_bytes()
    assert not (tmp_path / "ours.safetensors.partial").exists()


def test_tensor_bytes_of_empty_matrix():
    assert bytes(tensor_bytes(torch.empty(0, 4))) == b""


def test_tensor_bytes_are_little_endian_raw_bytes():
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert bytes(tensor_bytes(t)) == bytes.fromhex("803f00c0")  # bf16: 0x3f80, 0xc000
    assert bytes(tensor_bytes(torch.tensor(1.5))) == struct.pack("<f", 1.5)


# --------------------------------------------------------------------------------------------
# Writing: shard planning


def f32(name: str, n: int) -> tuple[str, str, tuple[int, ...]]:
    return name, "F32", (n,)


def members(plans) -> list[list[str]]:
    return [sorted(t.name for t in p.tensors) for p in plans]


def test_plan_shards_splits_greedily_and_names_shards():
    plans = plan_shards([f32(f"t{i}", 10) for i in range(5)], 100)  # 40 bytes each
    assert members(plans) == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert [p.filename for p in plans] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_oversized_tensor_gets_its_own_shard():
    plans = plan_shards([f32("a", 10), f32("huge", 100), f32("b", 10), f32("c", 10)], 100)
    assert members(plans) == [["a"], ["huge"], ["b", "c"]]


def test_single_shard_when_everything_fits():
    plans = plan_shards([f32("a", 10), f32("b", 10)], 10**9)
    assert [p.filename for p in plans] == ["model-00001-of-00001.safetensors"]


def random_specs(rng: random.Random) -> list[tuple[str, str, tuple[int, ...]]]:
    shapes = [(), (0,), (1,), (3, 0), (5,), (2, 3), (17,), (4, 4, 2), (33, 3)]
    names = rng.sample(range(1000), rng.randint(1, 12))
    return [(f"t{n}", rng.choice(list(SIZE)), rng.choice(shapes)) for n in names]


def test_random_plans_have_no_holes_or_overlaps():
    rng = random.Random(1234)
    for _ in range(300):
        specs = random_specs(rng)
        index = {s[0]: i for i, s in enumerate(specs)}
        limit = rng.randint(1, 400)
        plans = plan_shards(specs, limit)
        # every tensor exactly once; shards hold consecutive runs of the input order
        runs = [sorted(index[t.name] for t in p.tensors) for p in plans]
        assert [i for run in runs for i in run] == list(range(len(specs)))
        for k, p in enumerate(plans):
            (hlen,) = struct.unpack("<Q", p.header[:8])
            assert hlen == len(p.header) - 8 and len(p.header) % 8 == 0
            header = json.loads(p.header[8:])
            assert header.pop("__metadata__") == {"format": "pt"}
            assert set(header) == {t.name for t in p.tensors}
            pos = len(p.header)
            for t in sorted(p.tensors, key=lambda t: t.begin):  # contiguous from the header on
                assert (t.begin, t.end) == (pos, pos + nbytes(specs[index[t.name]]))
                assert header[t.name]["data_offsets"] == [t.begin - hlen - 8, t.end - hlen - 8]
                pos = t.end
            assert p.size == pos
            used = pos - len(p.header)
            assert used <= limit or len(p.tensors) == 1
            if k + 1 < len(plans):  # greedy: the next shard's first tensor did not fit here
                assert used + nbytes(specs[runs[k + 1][0]]) > limit


def test_random_plans_are_readable_by_safetensors(tmp_path):
    rng = random.Random(99)
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64, "I8": torch.int8}
    for trial in range(5):
        specs = [s for s in random_specs(rng) if s[1] in dtypes and len(s[2]) < 2]
        tensors = {n: torch.arange(nbytes((n, d, sh)) // SIZE[d]).reshape(sh).to(dtypes[d])
                   for n, d, sh in specs}  # fmt: skip
        out = tmp_path / str(trial)
        out.mkdir()
        loaded = {}
        for i, plan in enumerate(plan_shards(specs, 40)):
            loaded |= load_file(write_planned(out, plan, tensors, seed=i))
        assert loaded.keys() == tensors.keys()
        for n, t in tensors.items():
            assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t), n


# --------------------------------------------------------------------------------------------
# Reading


@pytest.fixture
def sample(tmp_path) -> Path:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "w": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "h": torch.randn(4, 4, generator=g).to(torch.float16),
        "v": torch.randn(11, generator=g),
        "ids": torch.arange(10, 20, dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "s.safetensors", metadata={"format": "pt", "k": "x"})
    return tmp_path / "s.safetensors"


def expected(path: Path, name: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as h:
        return h.get_tensor(name).reshape(-1)


RANGES = [(0, 1), (0, 16), (3, 9), (10, 11), (5, 5)]


def test_read_returns_element_ranges(sample):
    f = SafetensorsFile(sample)
    try:
        for name in ("w", "h", "v"):
            full = expected(sample, name)
            for s, e in [*RANGES, (0, full.numel()), (full.numel() - 2, full.numel())]:
                if e > full.numel():
                    continue
                view = f.read(name, s, e)
                assert view.dtype == full.dtype and view.shape == (e - s,)
                assert torch.equal(view, full[s:e]), (name, s, e)
                del view
    finally:
        f.close()


def test_read_bytes_of_int_tensor(sample):
    f = SafetensorsFile(sample)
    ids = expected(sample, "ids")
    assert f.read_bytes("ids", 2, 5) == ids[2:5].numpy().tobytes()
    assert f.read_bytes("ids", 4, 4) == b""
    with pytest.raises(IndexError):
        f.read_bytes("ids", 0, 11)
    f.close()


def test_release_and_preload_keep_values(sample):
    f = SafetensorsFile(sample)
    f.release("w", 0, 35)  # before anything is mapped: a no-op
    f.preload("w", 3, 35, bytearray(7))  # reads in pieces smaller than the range
    before = f.read("w", 0, 35).clone()
    f.preload("w", 10, 30, bytearray(1 << 20))
    f.release("w", 0, 35)
    f.release("v", 2, 3)
    after = f.read("w", 0, 35).clone()
    assert torch.equal(before, after)
    assert torch.equal(after, expected(sample, "w"))
    f.close()


def test_read_header_matches_official_header(sample):
    tensors, meta = read_header(sample)
    assert meta == {"format": "pt", "k": "x"}
    with safe_open(sample, framework="pt") as h:
        assert set(tensors) == set(h.keys())
        for name in h.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert tensors[name].shape == tuple(h.get_slice(name).get_shape())
    (hlen,) = struct.unpack("<Q", sample.read_bytes()[:8])
    assert min(t.begin for t in tensors.values()) == 8 + hlen


def data_ends(data: bytes) -> list[tuple[str, int]]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return [(k, v["data_offsets"][1]) for k, v in header.items()]


def test_truncated_file_is_refused(sample):
    data = sample.read_bytes()
    sample.write_bytes(data[:-3])
    with pytest.raises(InputError, match="truncated") as e:
        read_header(sample)
    assert str(sample) in str(e.value)
    last = max(data_ends(data), key=lambda kv: kv[1])[0]
    assert repr(last) in str(e.value)


def test_file_shorter_than_length_prefix(tmp_path):
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    with pytest.raises(InputError, match="too short") as e:
        read_header(p)
    assert str(p) in str(e.value)


BAD_HEADERS = {
    "header length > file size": (
        {"t": entry("F32", [1], 0, 4)},
        b"\0" * 4,
        10_000,
        ["larger than the file"],
    ),
    "corrupt JSON": (b'{"t": {"dtype": "F32", ', b"", None, ["corrupt"]),
    "overlapping offsets": (
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)},
        b"\0" * 12,
        None,
        ["overlap", "'a'", "'b'"],
    ),
    "offsets past the end": (
        {"t": entry("F32", [4], 0, 16)},
        b"\0" * 8,
        None,
        ["'t'", "data ends"],
    ),
    "begin after end": ({"t": entry("F32", [0], 8, 4)}, b"\0" * 8, None, ["'t'"]),
    "byte length != dtype x shape": (
        {"t": entry("F32", [3], 0, 8)},
        b"\0" * 8,
        None,
        ["'t'", "expected 12"],
    ),
    "unknown dtype": ({"t": entry("Q4", [2], 0, 2)}, b"\0" * 2, None, ["'t'", "Q4"]),
    "entry without offsets": ({"t": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, ["'t'"]),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_read_header_rejects_broken_files(tmp_path, case):
    header, data, length, fragments = BAD_HEADERS[case]
    p = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(InputError) as e:
        read_header(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg
    for frag in fragments:
        assert frag in msg


@pytest.mark.parametrize(
    "header",
    [
        {"__metadata__": "oops", "t": entry("F32", [1], 0, 4)},  # AttributeError
        {"t": {"dtype": "F32", "shape": "12", "data_offsets": [0, 8]}},  # read as shape (1, 2)
        {"t": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}},  # read as shape (2,)
    ],
    ids=["metadata-not-a-map", "shape-is-a-string", "shape-not-integer"],
)
def test_read_header_rejects_malformed_entries(tmp_path, header):
    p = raw_file(tmp_path / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(InputError):
        read_header(p)


# --------------------------------------------------------------------------------------------
# Model folders


def small_model(path: Path, **shapes: tuple[int, ...]) -> Path:
    path.mkdir(parents=True)
    save_file({n: torch.zeros(s) for n, s in shapes.items()}, path / "model.safetensors")
    return path


def test_sharded_folder_maps_every_tensor(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    save_file({"a": torch.ones(2)}, m / "model-00001-of-00002.safetensors")
    save_file({"b": torch.full((3,), 2.0)}, m / "model-00002-of-00002.safetensors")
    (m / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    folder = ModelFolder(m)
    assert sorted(folder.names()) == ["a", "b"]
    assert torch.equal(folder.read("b", 0, 3).clone(), torch.full((3,), 2.0))
    folder.close()


def test_index_pointing_outside_the_folder_is_refused(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    m = tmp_path / "m"
    m.mkdir()
    (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../x.safetensors"}})
    )
    with pytest.raises(InputError, match="outside the model folder") as e:
        ModelFolder(m)
    assert "'a'" in str(e.value) and "../x.safetensors" in str(e.value)


def test_pickle_only_folder_is_refused(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(InputError, match="safetensors") as e:
        ModelFolder(m)
    assert "pytorch_model.bin" in str(e.value) and str(m) in str(e.value)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(InputError) as e:
        ModelFolder(tmp_path)
    assert str(tmp_path) in str(e.value) and "model.safetensors" in str(e.value)


def test_check_compatible_reports_all_mismatches_at_once(tmp_path):
    base = small_model(tmp_path / "base", a=(2, 3), b=(4,), c=(5,))
    m = tmp_path / "other"
    m.mkdir()
    save_file({"a": torch.zeros(3, 2), "c": torch.zeros(5, dtype=torch.int32),
               "d": torch.zeros(1)}, m / "model.safetensors")  # fmt: skip
    folders = [ModelFolder(base), ModelFolder(m)]
    with pytest.raises(InputError) as e:
        check_compatible(folders[0], folders[1:])
    msg = str(e.value)
    assert "4 problems" in msg and "\n" not in msg
    for frag in ["'a'", "[3, 2]", "[2, 3]", "'b' is missing", "'c'", "I32", "'d'"]:
        assert frag in msg, frag
    assert str(m) in msg
    check_compatible(folders[0], [folders[0]])  # identical models pass
