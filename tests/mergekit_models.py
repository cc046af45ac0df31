"""Local tiny models for the mergekit config suite (``tests/mergekit_configs/``).

Each placeholder a config may use (``{base}``, ``{model_a}``, ...) is a folder built here from a
``transformers`` config with random weights, plus a tokenizer built locally with ``tokenizers``:

- ``{base}``, ``{ft1}``, ``{ft2}``, ``{ft3}``: the examples' 13B Llamas scaled down: hidden 8,
  vocabulary 64, bfloat16; the fine-tunes are the base plus small noise, all with the same
  tokenizer. 40 layers for a ``slices:`` config (so the examples' layer ranges run unchanged),
  4 for the others (TIES costs about 0.2 s per tensor on these machines whatever its size).
- ``{gpt2}``, ``{gpt2_like}``: a 12-layer GPT-2 (hidden 16, vocabulary 64), float32.
- ``{model_a}``, ``{model_b}``, ``{model_c}``: mergekit's test "picollama" (2 layers, hidden 32,
  vocabulary 64, independent random weights, float32, no tokenizer files).
- ``{model_base}`` (vocabulary 64 + its tokenizer), ``{model_chatml}`` (66 rows, the tokenizer
  plus ``<|im_start|>`` and ``<|im_end|>``), ``{model_padded}`` (64 rows, the tokenizer plus
  four ``<UNUSED_i>`` tokens that have no row): mergekit's tokenizer-test models.

Shared by ``tests/test_mergekit_configs.py`` and ``bench/mergekit_configs.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

CONFIGS = Path(__file__).resolve().parent / "mergekit_configs"
EXAMPLES = (
    "bio-merge",
    "gradient-slerp",
    "linear",
    "orcamini-platy-44layer",
    "ties",
    "gpt2-small",
)
"""mergekit's six example configs for a decoder LLM merge that mergekit 0.1.5 can run."""

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def make_tokenizer(vocab: int, added: list[str] = ()) -> transformers.PreTrainedTokenizerFast:
    """A BPE tokenizer without merges over ``<unk> <s> </s> _tok_3 ...`` (``vocab`` tokens),
    plus ``added`` tokens."""
    words = ["<unk>", "<s>", "</s>", *(f"_tok_{i}" for i in range(3, vocab))][:vocab]
    tok = Tokenizer(models.BPE({w: i for i, w in enumerate(words)}, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        fast.add_tokens(list(added))
    return fast


def _llama(vocab: int, layers: int, hidden: int, inter: int, heads: int, kv: int, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _save(model, path: Path, tok=None, dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return path


def _noisy(model, seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def example_layers(text: str) -> int:
    """Layers of the example family a config runs on: 40 for a ``slices:`` config, else 4."""
    return 40 if re.search(r"^slices:", text, re.M) else 4


def build(root: Path, names: set[str], layers: int = 40) -> dict[str, Path]:
    """Build the folders for the placeholders in ``names`` under ``root`` (once each); the
    example family (``{base}``, ``{ft1}``, ...) with ``layers`` layers."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    builders: dict[str, Callable[[Path], Path]] = {}
    tok64 = make_tokenizer(64)

    def example(seed: int) -> Callable[[Path], Path]:
        def make(p: Path) -> Path:
            m = _llama(64, layers, 8, 16, 2, 1, 1000)  # the same base for every fine-tune
            return _save(_noisy(m, seed, 0.01) if seed else m, p, tok64, torch.bfloat16)

        return make

    for i, name in enumerate(("base", "ft1", "ft2", "ft3")):
        builders[name] = example(i)

    def gpt2(p: Path) -> Path:
        torch.manual_seed(7)
        cfg = transformers.GPT2Config(
            n_embd=16, n_head=2, n_layer=12, n_positions=32, vocab_size=64
        )
        return _save(transformers.GPT2LMHeadModel(cfg), p, tok64)

    builders["gpt2"] = builders["gpt2_like"] = gpt2
    for i, name in enumerate(("model_a", "model_b", "model_c")):
        builders[name] = lambda p, s=i: _save(_llama(64, 2, 32, 48, 16, 16, 10 + s), p)
    builders["model_base"] = lambda p: _save(_llama(64, 2, 32, 48, 16, 16, 20), p, tok64)
    builders["model_chatml"] = lambda p: _save(
        _llama(66, 2, 32, 48, 16, 16, 21), p, make_tokenizer(64, ["<|im_start|>", "<|im_end|>"])
    )
    builders["model_padded"] = lambda p: _save(
        _llama(64, 2, 32, 48, 16, 16, 22),
        p,
        make_tokenizer(64, [f"<UNUSED_{i}>" for i in range(4)]),
    )
    for name in sorted(names):
        path = root / (f"l{layers}-{name}" if name in ("base", "ft1", "ft2", "ft3") else name)
        out[name] = path if (path / "config.json").exists() else builders[name](path)
    return out


KNOWN = frozenset({"base", "ft1", "ft2", "ft3", "gpt2", "gpt2_like", "model_a", "model_b",
                   "model_c", "model_base", "model_chatml", "model_padded"})  # fmt: skip


def placeholders(text: str) -> set[str]:
    """The placeholder names a config's text uses (``{base}`` -> ``base``)."""
    return set(_PLACEHOLDER.findall(text)) & KNOWN


def substitute(text: str, paths: dict[str, Path]) -> str:
    """``text`` with every ``{name}`` of ``paths`` replaced by that folder's path."""
    for name, path in paths.items():
        text = text.replace(f"{{{name}}}", str(path))
    return text


def config_text(name: str) -> str:
    return (CONFIGS / f"{name}.yml").read_text()


def materialize(name: str, models: Path, dest: Path) -> Path:
    """Write config ``name`` with its placeholders replaced by folders under ``models`` (built
    when missing) to ``dest/NAME.yml``; return that path."""
    text = config_text(name)
    paths = build(models, placeholders(text), example_layers(text))
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{name}.yml"
    out.write_text(substitute(text, paths))
    return out


def all_configs() -> list[str]:
    """Every config of the suite: the six examples, then the test-suite ones by name."""
    rest = sorted(p.stem for p in CONFIGS.glob("*.yml") if p.stem not in EXAMPLES)
    return [*EXAMPLES, *rest]
