"""``streammerge-yaml``: mergekit-yaml's command line, and ``streammerge CONFIG OUT``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import make_family

from streammerge.cli import main as streammerge
from streammerge.mergekit_cli import main as streammerge_yaml
from streammerge.mergekit_cli import parse_kmb

# mergekit 0.1.5's mergekit-yaml options (mergekit/options.py, MergeOptions fields as flags)
MERGEKIT_FLAGS = [
    "--allow-crimes", "--no-allow-crimes", "--unsafe-truncate-embeddings",
    "--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype", "--cuda", "--no-cuda",
    "--device", "--low-cpu-memory", "--out-shard-size", "--copy-tokenizer",
    "--no-copy-tokenizer", "--clone-tensors", "--trust-remote-code", "--random-seed",
    "--lazy-unpickle", "--write-model-card", "--no-write-model-card", "--safe-serialization",
    "--quiet", "--read-to-gpu", "--multi-gpu", "--num-threads", "-j", "--gpu-rich",
    "--async-write", "--write-threads", "-v",
]  # fmt: skip


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    base, fts = make_family(tmp_path / "m", k=2)
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    doc = {
        "merge_method": "dare_linear",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts],
        "dtype": "bfloat16",
    }
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))}


def test_every_mergekit_flag_is_accepted():
    help_text = CliRunner().invoke(streammerge_yaml, ["--help"]).output
    for flag in MERGEKIT_FLAGS:
        assert f" {flag}" in help_text or f"/{flag}" in help_text or f"{flag}," in help_text, flag


def test_mergekit_sizes():
    assert parse_kmb("5B") == 5_000_000_000  # mergekit's default, decimal
    assert parse_kmb("500M") == 500_000_000
    assert parse_kmb("2k") == 2000
    assert parse_kmb("1234") == 1234
    for bad in ("", "B", "1.5B", "0", "2GiB"):
        with pytest.raises(ValueError):
            parse_kmb(bad)


def test_no_op_flags_each_get_one_note_and_change_nothing(recipe, tmp_path):
    r = CliRunner().invoke(streammerge, ["run", str(recipe), str(tmp_path / "a"), "--quiet",
                                         "--max-memory", "4GiB"])  # fmt: skip
    assert r.exit_code == 0, r.output
    flags = ["--lazy-unpickle", "--allow-crimes", "--low-cpu-memory", "--trust-remote-code",
             "--clone-tensors", "-v", "--no-write-model-card", "--async-write"]  # fmt: skip
    r = CliRunner().invoke(
        streammerge_yaml, [str(recipe), str(tmp_path / "b"), "--max-memory", "4GiB", *flags]
    )
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert sorted(n.split(":")[1].strip() for n in notes) == sorted(flags), notes
    assert "merged" in r.stdout  # the summary
    assert shards(tmp_path / "a") == shards(tmp_path / "b")


def test_out_shard_size_random_seed_and_no_copy_tokenizer(recipe, tmp_path):
    doc = yaml.safe_load(recipe.read_text())
    doc["parameters"] = {"random_seed": 7}
    seeded = tmp_path / "seeded.yml"
    seeded.write_text(yaml.safe_dump(doc))
    r = CliRunner().invoke(streammerge, ["run", str(seeded), str(tmp_path / "a"), "--quiet",
                                         "--shard-size", "3000"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(streammerge_yaml, [str(recipe), str(tmp_path / "b"), "--quiet",
                                              "--out-shard-size", "3K", "--random-seed", "7",
                                              "--no-copy-tokenizer"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(shards(tmp_path / "a")) > 1
    assert shards(tmp_path / "a") == shards(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").exists()
    assert not (tmp_path / "b" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # another seed draws other random numbers
    args = [str(recipe), str(tmp_path / "c"), "--quiet", "--out-shard-size", "3K"]
    r = CliRunner().invoke(streammerge_yaml, [*args, "--random-seed", "8"])
    assert r.exit_code == 0, r.output
    assert shards(tmp_path / "c") != shards(tmp_path / "a")


def test_cuda_means_the_gpu(recipe, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags in (["--cuda"], ["--gpu-rich"], ["--device", "cuda"]):
        r = CliRunner().invoke(streammerge_yaml, [str(recipe), str(tmp_path / "o"), *flags])
        assert r.exit_code == 2, r.output
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cuda" in errors[0].lower(), r.stderr
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flag", ["--unsafe-truncate-embeddings", "--no-safe-serialization", "--device=xpu"]
)
def test_flags_that_would_change_the_output_are_refused(recipe, tmp_path, flag):
    r = CliRunner().invoke(streammerge_yaml, [str(recipe), str(tmp_path / "o"), flag])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert flag.split("=")[0].lstrip("-").split("-")[-1] in r.stderr
    assert not (tmp_path / "o").exists()


def test_bare_recipe_path_names_both_commands(recipe, tmp_path):
    r = CliRunner().invoke(streammerge, [str(recipe), str(tmp_path / "o")])
    assert r.exit_code == 2
    assert f"streammerge run {recipe} {tmp_path / 'o'}" in r.output
    assert f"streammerge-yaml {recipe} {tmp_path / 'o'}" in r.output
    assert "No such command" not in r.output


def test_console_script_is_declared():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["streammerge-yaml"] == "streammerge.mergekit_cli:main"
