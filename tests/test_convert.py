"""``streammerge convert``: pickle checkpoints to safetensors, without running any pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from test_streaming_equals_reference import load_output

from streammerge.cli import main
from streammerge.convert import ConvertOptions, convert_checkpoint
from streammerge.errors import StreamMergeError
from streammerge.lora import AdaptedFolder
from streammerge.model import ModelFolder


def checkpoint() -> dict[str, torch.Tensor]:
    """Every dtype family, a 0-d tensor, tied weights and views sharing one buffer."""
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(37, 24, generator=g).to(torch.bfloat16)
    qkv = torch.randn(72, 24, generator=g)
    return {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": embed,  # tied: the same tensor under two names
        "model.layers.0.q.weight": qkv[:24],  # views of one storage: each its own copy
        "model.layers.0.k.weight": qkv[24:48],
        "model.layers.0.v.weight": qkv[48:].t(),  # not contiguous
        "model.layers.0.mlp.weight": torch.randn(50, 24, generator=g).to(torch.float16),
        "model.norm.weight": torch.ones(24, dtype=torch.float64),
        "position_ids": torch.arange(10),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(0.5),
    }


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".converting-" in p.name]


def test_single_bin_round_trip(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    ckpt = checkpoint()
    torch.save(ckpt, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "tokenizer.json").write_text("{}")
    torch.save({"lr": 0.1}, src / "training_args.bin")  # a pickle: never copied
    (src / "runs").mkdir()
    s = convert_checkpoint(src, out)
    assert s.shards == ("model.safetensors",)
    assert s.tied == (("lm_head.weight", "model.embed_tokens.weight"),)
    assert set(s.copied) == {"config.json", "tokenizer.json"}
    assert "training_args.bin" in s.skipped and "runs/" in s.skipped
    got = load_output(out)
    assert set(got) == set(ckpt) - {"lm_head.weight"}
    for name, t in got.items():
        assert equal(t, ckpt[name]), name
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"
    ]  # fmt: skip
    folder = ModelFolder(out)  # streammerge's own reader accepts it
    assert folder.info("model.layers.0.v.weight").shape == (24, 24)
    folder.close()
    assert no_temp_left(tmp_path)


def test_sharded_bin_with_index(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    ckpt = checkpoint()
    names = list(ckpt)
    parts = [names[:4], names[4:]]  # the tied pair sits in the first file
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: ckpt[n] for n in part}, src / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    res = CliRunner().invoke(main, ["convert", str(src), str(out), "--shard-size", "3000"])
    assert res.exit_code == 0, res.output
    assert "tied: lm_head.weight is model.embed_tokens.weight" in res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    got = load_output(out)
    assert set(index["weight_map"]) == set(got) == set(ckpt) - {"lm_head.weight"}
    for name, fname in index["weight_map"].items():
        with safe_open(out / fname, framework="pt") as h:
            assert name in h.keys()  # noqa: SIM118
        assert equal(got[name], ckpt[name]), name
    sizes = sum(t.numel() * t.element_size() for t in got.values())
    assert index["metadata"]["total_size"] == sizes
    folder = ModelFolder(out)
    assert len(folder.names()) == len(got)
    folder.close()


def test_legacy_format_is_read_whole(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    t = {"w": torch.randn(5, 3)}
    torch.save(t, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    convert_checkpoint(src, out)
    assert equal(load_output(out)["w"], t["w"])


def test_adapter_bin_becomes_a_lora_input(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    from safetensors.torch import save_file

    w = torch.randn(6, 4)
    save_file({"proj.weight": w}, base / "model.safetensors")
    src, out = tmp_path / "adapter-bin", tmp_path / "adapter"
    src.mkdir()
    a, b = torch.randn(2, 4), torch.randn(6, 2)
    torch.save(
        {"base_model.model.proj.lora_A.weight": a, "base_model.model.proj.lora_B.weight": b},
        src / "adapter_model.bin",
    )
    (src / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    convert_checkpoint(src, out, ConvertOptions(shard_size=10))  # adapters stay one file
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]  # fmt: skip
    folder = AdaptedFolder(base, out)
    got = folder.read("proj.weight", 0, 24).reshape(6, 4)
    folder.close()
    assert torch.allclose(got, w + 2.0 * (b @ a), atol=1e-5)


class Payload:
    """A pickle that would run a command when loaded by plain ``pickle``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_not_run(tmp_path: Path) -> None:
    src, out, marker = tmp_path / "src", tmp_path / "out", tmp_path / "pwned"
    src.mkdir()
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, src / "pytorch_model.bin")
    res = CliRunner().invoke(main, ["convert", str(src), str(out)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "weights_only" in lines[0] and "pytorch_model.bin" in lines[0]
    assert not marker.exists()
    assert not out.exists() and no_temp_left(tmp_path)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({"w": torch.zeros(2), "epoch": 3}, "'epoch' is a int"),
        ([torch.zeros(2)], "not a mapping"),
        (b"garbage", "not a readable torch checkpoint"),
    ],
)
def test_unusable_checkpoints(tmp_path: Path, content: object, fragment: str) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    if isinstance(content, bytes):
        (src / "pytorch_model.bin").write_bytes(content)
    else:
        torch.save(content, src / "pytorch_model.bin")
    with pytest.raises(StreamMergeError, match=fragment):
        convert_checkpoint(src, out)
    assert not out.exists() and no_temp_left(tmp_path)


def test_refusals_before_work(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(StreamMergeError, match=r"no pytorch_model\.bin"):
        convert_checkpoint(src, tmp_path / "o")
    torch.save({"w": torch.zeros(2)}, src / "pytorch_model.bin")
    (tmp_path / "exists").mkdir()
    with pytest.raises(StreamMergeError, match="already exists"):
        convert_checkpoint(src, tmp_path / "exists")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../x"}}))
    with pytest.raises(StreamMergeError, match="not a file in"):
        convert_checkpoint(src, tmp_path / "o")


def test_a_failure_midway_leaves_no_output(tmp_path: Path, monkeypatch) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    torch.save(checkpoint(), src / "pytorch_model.bin")
    from streammerge import convert as convert_mod

    calls = []

    def failing(self, name, start, data):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, name, start, data)

    real = convert_mod.ShardWriter.write
    monkeypatch.setattr(convert_mod.ShardWriter, "write", failing)
    with pytest.raises(OSError):
        convert_checkpoint(src, out, ConvertOptions(shard_size=1000))
    assert len(calls) == 3
    assert not out.exists() and no_temp_left(tmp_path)
