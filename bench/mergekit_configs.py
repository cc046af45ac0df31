"""Run mergekit's example and test-suite configs through mergekit-yaml and streammerge-yaml.

Usage::

    python bench/mergekit_configs.py [--mergekit PATH/mergekit-yaml] [--work DIR] [--out table.md]
                                     [--configs a,b] [--reuse]

Every config of ``tests/mergekit_configs/`` (the six examples, then mergekit's test-suite
configs) gets its placeholders replaced by the local tiny models of
``tests/mergekit_models.py`` and runs through ``mergekit-yaml CONFIG OUT`` and
``streammerge-yaml CONFIG OUT``, both with their default flags (the tokenizer is copied). The
outputs are compared: tensor names and shapes, dtypes, every element in ulps of the output dtype
(elements more than 1 ulp apart are classified with ``bench/mergekit_parity.py``'s
:func:`compare`), the tokenizer files mergekit writes (byte for byte, else as JSON, else the
loaded vocabularies) and the chat template. Where the two tokenizers number the same tokens
differently (mergekit orders a union's new tokens by a Python ``set``), embedding and ``lm_head``
rows are aligned by token before comparing. The table goes to stdout (and ``--out``); the exit
status is 1 when a config fails in streammerge, or the outputs differ beyond what the parity
classes explain; 0 with a message when mergekit is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from mergekit_models import all_configs, materialize  # noqa: E402
from mergekit_parity import (  # noqa: E402
    CLASSES,
    Row,
    compare,
    find_mergekit,
    float64_reference,
    load_folder,
    run_tool,
    ulps,
)

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer.model", "added_tokens.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")  # fmt: skip
"""The tokenizer files mergekit 0.1.5 copies from its donor (``merge.py: _copy_tokenizer``)."""
CLASS_NAMES = {"mergekit_lowp": "mergekit further from f64", "rounding": "both within f32 "
               "rounding", "tie": "tie order", "random": "random stream",
               "unexplained": "unexplained"}  # fmt: skip
VOCAB = re.compile(r"(embed_tokens|lm_head|wte)\.weight$")


def models_doc(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The ``models:`` form of a one-slice config whose sources span the whole models (what
    the float64 reference and the tie classification take); None for a stack."""
    if "models" in doc:
        return doc
    if len(doc["slices"]) != 1 or len(doc["slices"][0]["sources"]) < 2:
        return None
    plain = {k: v for k, v in doc.items() if k != "slices"}
    plain["models"] = [{"model": s["model"]} for s in doc["slices"][0]["sources"]]
    if plain.get("parameters"):  # mergekit ignores a rule's 'pattern' key: no filter
        plain["parameters"] = {
            k: [{kk: vv for kk, vv in r.items() if kk != "pattern"} for r in v]
            if isinstance(v, list) and v and isinstance(v[0], dict) else v
            for k, v in plain["parameters"].items()
        }  # fmt: skip
    return plain


def vocab(folder: Path) -> dict[str, int] | None:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder).get_vocab()
    except Exception:
        return None


def align_rows(mk: dict[str, torch.Tensor], mk_vocab: dict[str, int], sm_vocab: dict[str, int]):
    """mergekit's vocabulary rows reordered into streammerge's token order."""
    for name, t in mk.items():
        if VOCAB.search(name) and t.dim() == 2:
            out = t.clone()
            for tok, i in sm_vocab.items():
                j = mk_vocab.get(tok)
                if j is not None and i < t.shape[0] and j < t.shape[0]:
                    out[i] = t[j]
            mk[name] = out


def tokenizer_files(mk: Path, sm: Path) -> str:
    names = [f for f in TOKENIZER_FILES if (mk / f).exists() or (sm / f).exists()]
    if not names:
        return "none (both)"
    missing = [f"{f} only {'mergekit' if (mk / f).exists() else 'ours'}" for f in names
               if (mk / f).exists() != (sm / f).exists()]  # fmt: skip
    same, as_json, differ = [], [], []
    for f in names:
        if not ((mk / f).exists() and (sm / f).exists()):
            continue
        a, b = (mk / f).read_bytes(), (sm / f).read_bytes()
        if a == b:
            same.append(f)
        elif f.endswith(".json") and json.loads(a) == json.loads(b):
            as_json.append(f)
        else:
            differ.append(f)
    parts = []
    if not (missing or as_json or differ):
        return f"identical ({len(same)} files)"
    if as_json:
        parts.append(f"same JSON: {', '.join(as_json)}")
    if differ:
        va, vb = vocab(mk), vocab(sm)
        same_vocab = va is not None and va == vb
        how = "same vocabulary" if same_vocab else "vocabularies differ"
        parts.append(f"bytes differ: {', '.join(differ)} ({how})")
    parts += missing
    if same:
        parts.append(f"identical: {len(same)}")
    return "; ".join(parts)


def chat_template(mk: Path, sm: Path) -> str:
    import transformers

    def get(p: Path) -> str | None:
        try:
            return transformers.AutoTokenizer.from_pretrained(p).chat_template
        except Exception:
            return None

    a, b = get(mk), get(sm)
    if a is None and b is None:
        return "none (both)"
    if a == b:
        return "equal"
    if a is None or b is None:
        return f"only {'ours' if a is None else 'mergekit'}"
    ta, tb = (transformers.AutoTokenizer.from_pretrained(p) for p in (mk, sm))
    for msgs in MESSAGES:
        for gen in (False, True):
            ra = ta.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            rb = tb.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            if ra != rb:
                return f"differ (renders differ: {ra[:40]!r} vs {rb[:40]!r})"
    return "text differs, renders equal"


MESSAGES = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b"},
     {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
]  # fmt: skip
"""Conversations rendered with both chat templates when their texts differ."""


def classified(row: Row) -> str:
    n = sum(row.beyond.values())
    if not n:
        return "0"
    parts = [f"{row.beyond[c]:,} {CLASS_NAMES[c]}" for c in CLASSES if row.beyond[c]]
    return f"{n:,}: " + ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", help="mergekit-yaml executable (default: PATH, /work/mk-venv)")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--configs", help="comma-separated subset (default: all)")
    ap.add_argument("--work", type=Path, help="keep models and outputs here")
    ap.add_argument("--reuse", action="store_true", help="with --work: reuse finished outputs")
    args = ap.parse_args(argv)
    exe = find_mergekit(args.mergekit)
    if exe is None:
        print("mergekit is not installed (no mergekit-yaml); skipping the comparison.")
        return 0
    names = all_configs()
    if args.configs:
        wanted = args.configs.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"no such config: {', '.join(unknown)}")
        names = [n for n in names if n in wanted]
    work = args.work or Path(tempfile.mkdtemp(prefix="mk-configs-"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    sm_exe = [sys.executable, "-c", "from streammerge.mergekit_cli import main; main()"]

    lines = []
    bad = []
    for name in names:
        d = work / "runs" / name
        recipe = materialize(name, work / "models", d)
        doc = yaml.safe_load(recipe.read_text())
        mk_out, sm_out = d / "mk", d / "sm"
        runs = []
        for tool, out, cmd, e in (
            ("mergekit", mk_out, [exe, str(recipe), str(mk_out), "--quiet"], None),
            ("streammerge", sm_out, [*sm_exe, str(recipe), str(sm_out), "--quiet"], env),
        ):
            done = out / ("streammerge.json" if tool == "streammerge" else "config.json")
            if args.reuse and done.exists() and (d / f"{tool}.ok").exists():
                runs.append("")
                continue
            shutil.rmtree(out, ignore_errors=True)
            (d / f"{tool}.ok").unlink(missing_ok=True)
            try:
                t0 = time.perf_counter()
                run_tool(cmd, d / f"{tool}.log", e)
                (d / f"{tool}.ok").write_text(f"{time.perf_counter() - t0:.1f}")
                runs.append("")
            except RuntimeError as err:
                runs.append(f"{tool}: {err}")
        failed = [r for r in runs if r]
        if failed:
            why = "; ".join(failed).replace("|", "/")
            lines.append(f"| `{name}` | no | | | | | | | | | | {why[:400]} |")
            if runs[1]:
                bad.append(name)
            print(f"{name}: {why}", file=sys.stderr)
            continue
        mk, sm = load_folder(mk_out), load_folder(sm_out)
        same_names = sorted(mk) == sorted(sm)
        same_shapes = same_names and all(mk[n].shape == sm[n].shape for n in mk)
        dt_diff = sorted({f"{mk[n].dtype}->{sm[n].dtype}".replace("torch.", "")
                          for n in mk if n in sm and mk[n].dtype != sm[n].dtype})  # fmt: skip
        note = []
        mv, sv = vocab(mk_out), vocab(sm_out)
        if mv is not None and sv is not None and mv != sv and set(mv) == set(sv):
            align_rows(mk, mv, sv)
            note.append("token ids differ (rows aligned by token)")
        row = Row(name, doc.get("dtype", ""))
        mdoc = models_doc(doc)
        ref, inputs = None, []
        if mdoc is not None and same_shapes:
            try:
                ref = float64_reference(mdoc)
            except Exception as err:
                note.append(f"no float64 reference ({err})")
            folders = [Path(mdoc.get("base_model") or mdoc["models"][0]["model"])]
            folders += [Path(m["model"]) for m in mdoc["models"]]
            if not {"tokenizer", "tokenizer_source"} & set(doc):  # else rows are remapped
                inputs = [load_folder(f) for f in folders]
        max_ulp = 0
        if same_shapes:
            for n in mk:
                a, b = mk[n], sm[n]
                if a.dtype != b.dtype and a.dtype.itemsize > b.dtype.itemsize:
                    a = a.to(b.dtype)
                if a.dtype == b.dtype and a.is_floating_point():
                    max_ulp = max(max_ulp, int(ulps(a.flatten(), b.flatten()).max()))
            compare(row, doc["merge_method"], mdoc or {"models": []}, mk, sm, ref, inputs)
        if not same_names:
            only_mk, only_sm = sorted(set(mk) - set(sm)), sorted(set(sm) - set(mk))
            note.append(f"names differ: only mergekit {only_mk[:2]}, only ours {only_sm[:2]}")
        note += sorted(row.notes)
        if row.error and same_shapes:
            note.append(row.error)
        tok = tokenizer_files(mk_out, sm_out)
        chat = chat_template(mk_out, sm_out)
        names_col = "yes" if same_shapes else ("names only" if same_names else "no")
        dtypes_col = "yes" if not dt_diff else f"no: {', '.join(dt_diff)}"
        lines.append(
            f"| `{name}` | both | {names_col} | {dtypes_col} | {row.elements:,} | "
            f"{row.equal:,} | {max_ulp:,} | {row.max_abs:.3g} | {classified(row)} | {tok} | "
            f"{chat} | {'; '.join(note)} |"
        )
        if not same_shapes or row.beyond["unexplained"] or row.error:
            bad.append(name)
        print(lines[-1], file=sys.stderr)

    head = (
        "| config | runs | tensors equal (names, shapes) | dtypes equal | elements | equal "
        "| max ulp | max abs diff | > 1 ulp (classified) | tokenizer files | chat template "
        "| note |\n"
        "|---|---|---|---|---:|---:|---:|---:|---|---|---|---|\n"
    )
    cpu = platform.processor() or platform.machine()
    text = (
        head
        + "\n".join(lines)
        + (
            f"\n\nmergekit-yaml {exe}; streammerge-yaml; {platform.system()} {cpu}, "
            f"torch {torch.__version__}.\n"
        )
    )
    print(text)
    if args.out:
        args.out.write_text(text)
    if bad:
        print(f"differences to look at: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
