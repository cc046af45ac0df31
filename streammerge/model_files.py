"""Which files of the base folder a merged model needs besides its weights.

``from_pretrained`` reads more than ``config.json``: custom code (``modeling_*.py`` and the
modules it imports, for ``trust_remote_code``), processor and feature-extractor configs, the
generation config, and a tokenizer in any of its formats (``tokenizer.json``, SentencePiece
``*.model``, tiktoken, ``vocab.*`` + ``merges.txt``) with its chat template. Every such file at
the top of the base folder is copied into OUT_DIR; weight files (and their index) never are,
since the merge writes its own. The base's ``README.md`` is not copied (the merge writes its
own card), nor anything else a loader does not read (licences, training state, adapters).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.ckpt", "*.h5", "*.msgpack",
           "*.onnx", "*.npz", "*.pkl", "*.pickle", "*.tflite", "*.index.json",
           "*.index")  # fmt: skip
"""Weight files and weight indexes: never copied, whatever else they match."""
TOKENIZER = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
             "*.model", "*.tiktoken", "*.spm", "chat_template.*", "tokenization_*.py")  # fmt: skip
"""A tokenizer in any format, and its chat template (left out by ``--no-copy-tokenizer``)."""
OTHERS = ("config.json", "generation_config.json", "*processor_config.json",
          "feature_extractor*.json", "*.py")  # fmt: skip
"""The model's config, generation config, processor and feature-extractor configs, and code
(``modeling_*.py``, ``configuration_*.py`` and whatever modules they import)."""
JSON_NAMES = ("*.json",)
"""Copied files that must parse as JSON (checked before any heavy work)."""
WITH_DTYPE = "config.json"
"""The copied file that records the output dtype (``torch_dtype``/``dtype``)."""


def wanted(name: str, tokenizer: bool = True) -> bool:
    """Whether a file called ``name`` at the top of the base folder is copied."""
    if any(fnmatchcase(name, p) for p in WEIGHTS):
        return False
    if any(fnmatchcase(name, p) for p in TOKENIZER):
        return tokenizer
    return any(fnmatchcase(name, p) for p in OTHERS)


CODE_PREFIXES = ("modeling_", "configuration_", "tokenization_", "processing_",
                 "image_processing_", "feature_extraction_", "video_processing_")  # fmt: skip
"""Names transformers gives custom code: a folder holding only such files may be our output."""


def looks_copied(name: str) -> bool:
    """Whether a file in an output folder without a journal may be one a run copied: a
    loader's file, but not any ``*.py`` (a project folder's ``train.py`` is not ours to
    delete on ``--restart``)."""
    if name.endswith(".py") and not name.startswith(CODE_PREFIXES):
        return False
    return wanted(name)


def is_json(name: str) -> bool:
    return any(fnmatchcase(name, p) for p in JSON_NAMES)


def model_files(base: Path, tokenizer: bool = True) -> list[Path]:
    """The base's files to copy, sorted by name: regular files or links to them (the copy
    holds the content; a broken link is the caller's to refuse). Folders are not descended."""
    try:
        entries = sorted(base.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    return [p for p in entries if wanted(p.name, tokenizer) and (p.is_file() or p.is_symlink())]
