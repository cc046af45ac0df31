"""Bad input is refused with streammerge's own error naming the file (issue 11, item 6)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from streammerge.errors import StreamMergeError
from streammerge.model import ModelFolder
from streammerge.recipe import load_recipe
from streammerge.safetensors_io import read_header


def _write_st(path: Path, header: dict, data: bytes = b"") -> Path:
    js = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(js)) + js + data)
    return path


def _entry(shape: list, b: int = 0, e: int = 4) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [b, e]}


@pytest.mark.parametrize("wm", [[], "model.safetensors", None, 3])
def test_weight_map_not_object(tmp_path: Path, wm: object) -> None:
    _write_st(tmp_path / "model-1.safetensors", {"a": _entry([1])}, b"\0" * 4)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(StreamMergeError, match=r"index\.json"):
        ModelFolder(tmp_path)


@pytest.mark.parametrize("shape", [[2**63], [2**64, 1], [1, 2**70]])
def test_huge_dimension(tmp_path: Path, shape: list) -> None:
    p = _write_st(tmp_path / "m.safetensors", {"w": _entry(shape)}, b"\0" * 4)
    with pytest.raises(StreamMergeError, match=r"m\.safetensors: tensor 'w'"):
        read_header(p)


@pytest.mark.parametrize("shape", [[-1], [1.5], ["2"], [None]])
def test_bad_dimension(tmp_path: Path, shape: list) -> None:
    p = _write_st(tmp_path / "m.safetensors", {"w": _entry(shape)}, b"\0" * 4)
    with pytest.raises(StreamMergeError, match=r"m\.safetensors: tensor 'w'"):
        read_header(p)


@pytest.mark.parametrize(
    "names", [["../x"], [""], ["a/../b"], ["/abs"], ["p", "p/q"], ["p/q", "p"]]
)
def test_bad_tensor_names(tmp_path: Path, names: list[str]) -> None:
    header = {n: _entry([1], 4 * i, 4 * i + 4) for i, n in enumerate(names)}
    p = _write_st(tmp_path / "m.safetensors", header, b"\0" * (4 * len(names)))
    with pytest.raises(StreamMergeError, match=r"m\.safetensors: tensor"):
        read_header(p)


def test_lone_surrogate_name(tmp_path: Path) -> None:
    js = b'{"a\\udc80": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(js)) + js + b"\0" * 4)
    with pytest.raises(StreamMergeError, match=r"m\.safetensors: tensor"):
        read_header(p)


def test_zero_tensors(tmp_path: Path) -> None:
    _write_st(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}})
    with pytest.raises(StreamMergeError, match="no tensors"):
        ModelFolder(tmp_path)


def _recipe(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_bytes(data)
    return p


VALID = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n"


@pytest.mark.parametrize("enc", ["utf-16", "latin-1"])
def test_recipe_encoding(tmp_path: Path, enc: str) -> None:
    p = _recipe(tmp_path, ("# café\n" + VALID).encode(enc))
    with pytest.raises(StreamMergeError, match=r"recipe\.yaml"):
        load_recipe(p)


def test_recipe_deep(tmp_path: Path) -> None:
    p = _recipe(tmp_path, (VALID + "x: " + "[" * 50000 + "]" * 50000 + "\n").encode())
    with pytest.raises(StreamMergeError, match=r"recipe\.yaml: .*nested"):
        load_recipe(p)


def test_recipe_alias_bomb(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
    p = _recipe(tmp_path, (VALID + "junk:\n" + "\n".join("  " + ln for ln in lines)).encode())
    with pytest.raises(StreamMergeError, match=r"recipe\.yaml: .*alias"):
        load_recipe(p)


def test_recipe_too_big(tmp_path: Path) -> None:
    p = _recipe(tmp_path, (VALID + "#" * (2 << 20) + "\n").encode())
    with pytest.raises(StreamMergeError, match=r"recipe\.yaml: .*larger"):
        load_recipe(p)
