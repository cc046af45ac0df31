"""Files ``from_pretrained`` needs besides the weights are copied from the base, listed in the
summary; weight files never are."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_family

from streammerge import InputError, StreamMergeError, parse_recipe, run_merge
from streammerge.cli import main

NEEDED = {
    "config.json": '{"model_type": "toy", "auto_map": {"AutoModel": "modeling_toy.ToyModel"}}',
    "generation_config.json": '{"do_sample": false}',
    "modeling_toy.py": "from .rotary import rope\n",
    "configuration_toy.py": "# config class\n",
    "rotary.py": "def rope(): ...\n",  # imported by the modeling code
    "tokenization_toy.py": "# tokenizer class\n",
    "preprocessor_config.json": '{"feature_extractor_type": "Toy"}',
    "processor_config.json": '{"processor_class": "ToyProcessor"}',
    "video_preprocessor_config.json": "{}",
    "tokenizer.tiktoken": "aGVsbG8= 0\n",
    "spiece.model": "\x00sentencepiece",
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"model_max_length": 8}',
    "special_tokens_map.json": "{}",
    "added_tokens.json": "{}",
    "vocab.txt": "a\nb\n",
    "merges.txt": "#version: 0.2\n",
    "chat_template.jinja": "{{ messages }}",
}
TOKENIZER = {"tokenizer.tiktoken", "spiece.model", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.txt", "merges.txt",
             "chat_template.jinja", "tokenization_toy.py"}  # fmt: skip
NEVER = {
    "pytorch_model.bin": "pickle",
    "optimizer.pt": "pickle",
    "rng_state.pth": "pickle",
    "model.gguf": "gguf",
    "last.ckpt": "pickle",
    "tf_model.h5": "hdf5",
    "flax_model.msgpack": "msgpack",
    "pytorch_model.bin.index.json": "{}",
    "extra.safetensors": "not ours",
    "README.md": "the base's card",  # the merge writes its own
    "LICENSE": "licence",
    "adapter_config.json": "{}",  # would make the output look like a PEFT adapter
    "trainer_state.json": "{}",
}


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    base, fts = make_family(tmp_path / "m", k=2)
    for name, text in {**NEEDED, **NEVER}.items():
        (base / name).write_text(text)
    (base / "subfolder").mkdir()
    (base / "subfolder" / "config.json").write_text("{}")
    return base, fts


def recipe(base: Path, fts: list[Path]) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts],
    }


def out_files(out: Path) -> set[str]:
    ours = {"streammerge.json", "README.md", "model.safetensors.index.json", "occupancy.zarr"}
    return {p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("model-")}


def test_everything_loading_needs_is_copied_and_listed(family, tmp_path):
    base, fts = family
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe(base, fts)))
    r = CliRunner().invoke(main, ["run", str(path), str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert out_files(out) == set(NEEDED)
    for name, text in NEEDED.items():
        assert (out / name).read_text() == text, name
    assert "the base's card" not in (out / "README.md").read_text()
    listed = [line for line in r.stdout.splitlines() if line.startswith("copied from the base: ")]
    assert len(listed) == 1
    assert set(listed[0].removeprefix("copied from the base: ").split(", ")) == set(NEEDED)


def test_no_copy_tokenizer_leaves_the_tokenizer_out(family, tmp_path):
    s = run_merge(parse_recipe(recipe(*family)), tmp_path / "out", copy_tokenizer=False)
    assert out_files(tmp_path / "out") == set(NEEDED) - TOKENIZER
    assert set(s.files) == set(NEEDED) - TOKENIZER


def test_a_linked_file_is_copied_as_a_file(family, tmp_path):
    base, fts = family
    outside = tmp_path / "shared-tokenizer.json"
    outside.write_text('{"shared": true}')
    (base / "tokenizer.json").unlink()
    os.symlink(outside, base / "tokenizer.json")
    run_merge(parse_recipe(recipe(base, fts)), tmp_path / "out")
    copied = tmp_path / "out" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_text() == '{"shared": true}'
    copied.write_text("{}")  # the copy is the output's own
    assert outside.read_text() == '{"shared": true}'


@pytest.mark.parametrize(
    ("name", "damage", "words"),
    [
        ("tokenization_toy.py", "link", "broken link"),
        ("processor_config.json", "json", "invalid JSON"),
    ],
)
def test_a_bad_file_stops_the_merge_before_work(family, tmp_path, name, damage, words):
    base, fts = family
    (base / name).unlink()
    if damage == "link":
        os.symlink(tmp_path / "gone", base / name)
    else:
        (base / name).write_text("{not json")
    with pytest.raises(InputError, match=words) as e:
        run_merge(parse_recipe(recipe(base, fts)), tmp_path / "out")
    assert name in str(e.value)
    assert not (tmp_path / "out" / "streammerge.json").exists()
    assert not list((tmp_path / "out").glob("model-*")) if (tmp_path / "out").exists() else True


def test_force_replaces_copied_files_that_the_base_no_longer_has(family, tmp_path):
    base, fts = family
    run_merge(parse_recipe(recipe(base, fts)), tmp_path / "out")
    (base / "rotary.py").unlink()
    run_merge(parse_recipe(recipe(base, fts)), tmp_path / "out", force=True)
    assert out_files(tmp_path / "out") == set(NEEDED) - {"rotary.py"}


def test_a_folder_with_someone_elses_code_is_not_taken_for_an_output(family, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "train.py").write_text("print('mine')")
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(StreamMergeError, match=r"train\.py"):
        run_merge(parse_recipe(recipe(*family)), out, restart=True)
    assert (out / "train.py").read_text() == "print('mine')"
