"""streammerge vs mergekit 0.1.5 on tokenizer recipes: output tensors, vocabulary, config and
chat template, side by side.

Usage::

    python bench/tokenizer_vs_mergekit.py [--root /tmp/sm-tok] \\
        [--mergekit "python -m mergekit.scripts.run_yaml"]

The family: a tiny Llama base with a 256-token WordLevel tokenizer and two fine-tunes that
added tokens (258 rows each: ``<tool>``/``<think>`` and ``<think>``/``<sep>``), float32.
Each case (union, base, a model, padding, ``tokens:`` rules, the built-in chat templates) is
merged with ``task_arithmetic`` by both tools from the same YAML. Rows are compared token by
token (mergekit orders the union's new tokens by a Python ``set`` of models, which changes
with ``PYTHONHASHSEED``; streammerge follows the recipe), so "max abs diff" is over every
tensor with vocabulary rows aligned by token. Chat templates are compared by rendering a few
conversations. ``--mergekit`` is a command that runs ``mergekit-yaml`` (mergekit is never
imported here).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import torch
import transformers
import yaml
from safetensors import safe_open

from streammerge import parse_recipe, run_merge
from streammerge.tokenizer import VOCAB_TENSOR

HIDDEN = 16
WORDS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(253))]
MSGS = [
    [{"role": "user", "content": " hi  "}],
    [{"role": "system", "content": "be nice"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b "}, {"role": "user", "content": "c"}],
]  # fmt: skip


def tokenizer(extra: list[str]) -> transformers.PreTrainedTokenizerFast:
    import tokenizers

    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({t: i for i, t in enumerate(WORDS)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_tokens(extra)
    return fast


def family(root: Path) -> tuple[Path, Path, Path]:
    def llama(vocab: int, seed: int) -> transformers.LlamaForCausalLM:
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg)

    base = llama(256, 0)
    base.save_pretrained(root / "base")
    tokenizer([]).save_pretrained(root / "base")
    sd = base.state_dict()
    for seed, name, extra in ((1, "ft1", ["<tool>", "<think>"]), (2, "ft2", ["<think>", "<sep>"])):
        ft = llama(258, seed)
        with torch.no_grad():
            for n, p in ft.named_parameters():
                p[: sd[n].shape[0]] = sd[n] + 0.02 * torch.randn(sd[n].shape)
        ft.save_pretrained(root / name)
        tokenizer(extra).save_pretrained(root / name)
    return root / "base", root / "ft1", root / "ft2"


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():  # noqa: SIM118
                out[k] = h.get_tensor(k)
    return out


def compare(ours: Path, theirs: Path) -> dict[str, object]:
    ta, tb = (transformers.AutoTokenizer.from_pretrained(p) for p in (ours, theirs))
    va, vb = ta.get_vocab(), tb.get_vocab()
    a, b = load(ours), load(theirs)
    diff, shapes = 0.0, True
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or a[name].shape != b[name].shape:
            shapes = False
            continue
        x, y = a[name].float(), b[name].float()
        if VOCAB_TENSOR.search(name):  # token-indexed: align rows by token
            common = [t for t in va if t in vb]
            x = torch.cat([x[[va[t] for t in common]], x[len(va) :]])
            y = torch.cat([y[[vb[t] for t in common]], y[len(vb) :]])
        diff = max(diff, (x - y).abs().max().item())

    def render(tok: transformers.PreTrainedTokenizerBase) -> list[str]:
        if tok.chat_template is None:
            return []
        return [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)
                for m in MSGS for g in (False, True)]  # fmt: skip

    cfg = [json.loads((p / "config.json").read_text())["vocab_size"] for p in (ours, theirs)]
    return {
        "shapes equal": shapes,
        "max abs diff": f"{diff:.1e}",
        "same tokens": set(va) == set(vb),
        "same ids": va == vb,
        "vocab_size": f"{cfg[0]} / {cfg[1]}",
        "template renders equal": render(ta) == render(tb),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/sm-tok"))
    ap.add_argument("--mergekit", default="mergekit-yaml", help="command running mergekit-yaml")
    args = ap.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    base, ft1, ft2 = (str(p) for p in family(args.root))
    cases: dict[str, dict[str, object]] = {
        "union": {"tokenizer_source": "union"},
        "base": {"tokenizer_source": "base"},
        "model (ft1)": {"tokenizer_source": ft1},
        "union, pad 64": {"tokenizer": {"source": "union", "pad_to_multiple_of": 64}},
        "tokens: zero/model_token/model, force": {"tokenizer": {"source": "union", "tokens": {
            "w5": {"source": {"kind": "zero"}, "force": True},
            "<new>": {"source": {"kind": "model_token", "model": base, "token": "w7"}},
            "<tool>": {"source": ft1, "force": True},
            "<think>": {"source": {"kind": "model_token", "model": ft2, "token_id": 9}}}}},
        **{f"chat_template: {t}": {"tokenizer_source": "union", "chat_template": t}
           for t in ("chatml", "llama3", "mistral", "alpaca", "exaone")},
    }  # fmt: skip
    rows = []
    for i, (label, top) in enumerate(cases.items()):
        doc = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
               "models": [{"model": ft1, "parameters": {"weight": 0.5}},
                          {"model": ft2, "parameters": {"weight": 0.7}}], **top}  # fmt: skip
        cfg = args.root / f"case{i}.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        ours, theirs = args.root / f"sm{i}", args.root / f"mk{i}"
        run_merge(parse_recipe(doc), ours, progress=False)
        cmd = [*shlex.split(args.mergekit), str(cfg), str(theirs), "--copy-tokenizer"]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            rows.append({"case": label, "mergekit": proc.stderr.strip().splitlines()[-1]})
            continue
        rows.append({"case": label, **compare(ours, theirs)})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
