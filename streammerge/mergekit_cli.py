"""``streammerge-yaml CONFIG OUT [flags]``: mergekit-yaml's command line over :func:`run_merge`.

Every flag of mergekit 0.1.5's ``mergekit-yaml`` is accepted. Those with a streammerge
equivalent are mapped onto it (``--cuda``, ``--device``, ``--out-shard-size``,
``--random-seed``, ``--copy-tokenizer/--no-copy-tokenizer``, ``--quiet``); the others change
nothing streammerge does (it always streams, never unpickles, writes safetensors) and are
accepted with one ``note:`` line each when given. The two that would change the output in a
way streammerge does not implement (``--unsafe-truncate-embeddings``,
``--no-safe-serialization``) are refused. streammerge's own ``--max-memory``, ``--restart``,
``--force`` and ``--allow-nonfinite`` work as in ``streammerge run``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .cli import _print_summary, _size, _user_errors, warning
from .errors import StreamMergeError
from .options import MergeOptions

NOTES: dict[str, str] = {
    "allow_crimes": "streammerge checks that tensor names and shapes match, not architectures",
    "lazy_unpickle": "streammerge never unpickles; it maps safetensors shards",
    "low_cpu_memory": "streammerge streams chunk by chunk inside --max-memory",
    "read_to_gpu": "with --cuda, chunks are staged to the GPU as they stream",
    "multi_gpu": "streammerge uses one GPU",
    "clone_tensors": "every output tensor is written separately",
    "trust_remote_code": "streammerge never runs model code (the base's *.py files are copied)",
    "transformers_cache": "streammerge reads local folders only and downloads nothing",
    "lora_merge_cache": "LoRA adapters are applied as each tensor streams; nothing is cached",
    "lora_merge_dtype": "LoRA updates are computed in float32, rounded once to the tensor's dtype",
    "async_write": "streammerge always writes behind the computation",
    "write_threads": "streammerge writes on one background thread",
    "verbosity": "streammerge has no log levels (--verbose on `streammerge run` shows tracebacks)",
    "write_model_card": "streammerge always writes README.md (the card records the recipe)",
}
"""mergekit flags with no effect on a streammerge merge, and why (printed when given)."""


def parse_kmb(value: str) -> int:
    """mergekit's sizes: a plain number, or K/M/B suffixes in powers of 1000 (``5B`` = 5e9)."""
    v = value.strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(v[-1:].lower(), 1)
    digits = v[:-1] if scale > 1 else v
    if not digits.isdigit() or int(digits) == 0:
        raise ValueError(value)
    return int(digits) * scale


def _shard_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_kmb(value)
    except ValueError:
        return _size(ctx, param, value)  # ours: 2GiB, 500MB


MERGEKIT_FLAGS = [
    ("--allow-crimes/--no-allow-crimes", {}, "Allow mixing architectures (no effect)."),
    ("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", {}, "Refused."),
    ("--transformers-cache", {"metavar": "DIR"}, "No effect: nothing is downloaded."),
    ("--lora-merge-cache", {"metavar": "DIR"}, "No effect."),
    ("--lora-merge-dtype", {"metavar": "DTYPE"}, "No effect."),
    ("--cuda/--no-cuda", {}, "Run the math on the GPU (= --device cuda)."),
    ("--device", {"metavar": "DEVICE"}, "cpu, cuda or auto."),
    ("--low-cpu-memory/--no-low-cpu-memory", {}, "No effect: memory stays in --max-memory."),
    ("--out-shard-size", {"metavar": "SIZE", "callback": _shard_size},
     "Largest output shard in bytes, mergekit's form (5B = 5e9, 500M) or ours (2GiB)."),
    ("--copy-tokenizer/--no-copy-tokenizer", {"default": True},
     "Copy the base's tokenizer files and chat template [default: copy]."),
    ("--clone-tensors/--no-clone-tensors", {}, "No effect."),
    ("--trust-remote-code/--no-trust-remote-code", {}, "No effect: no model code is run."),
    ("--random-seed", {"type": int, "metavar": "INT"},
     "The method's random_seed unless the recipe sets one."),
    ("--lazy-unpickle/--no-lazy-unpickle", {}, "No effect: nothing is unpickled."),
    ("--write-model-card/--no-write-model-card", {"default": True}, "The card is always written."),
    ("--safe-serialization/--no-safe-serialization", {"default": True},
     "Output is always safetensors."),
    ("--read-to-gpu/--no-read-to-gpu", {}, "No effect."),
    ("--multi-gpu/--no-multi-gpu", {}, "No effect: one GPU."),
    (("--num-threads", "-j"), {"type": int, "metavar": "N"}, "torch's CPU threads."),
    ("--gpu-rich", {"is_flag": True}, "= --cuda (the other parts have no effect)."),
    ("--async-write/--no-async-write", {}, "No effect: always writes behind."),
    ("--write-threads", {"type": int, "metavar": "N"}, "No effect."),
]  # fmt: skip
"""mergekit 0.1.5's ``add_merge_options``, flag for flag (``-v`` and ``--quiet`` below)."""


def _flags(fn: Any) -> Any:
    for decl, extra, text in reversed(MERGEKIT_FLAGS):
        decls = decl if isinstance(decl, tuple) else (decl,)
        fn = click.option(*decls, help=text, **extra)(fn)
    return fn


@click.command("streammerge-yaml")
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_path", type=click.Path(file_okay=False, path_type=Path))
@_flags
@click.option("-v", "verbosity", count=True, help="No effect (mergekit's log level).")
@click.option("--quiet/--no-quiet", default=False, help="No progress bar and no summary.")
@click.option(
    "--max-memory",
    callback=_size,
    metavar="SIZE",
    help="streammerge: peak RSS budget (default: half the available RAM).",
)
@click.option("--restart", is_flag=True, help="streammerge: discard an interrupted run.")
@click.option("--force", is_flag=True, help="streammerge: replace a finished merge.")
@click.option("--allow-nonfinite", is_flag=True, help="streammerge: merge NaN/Inf values.")
@_user_errors
def main(config_file: Path, out_path: Path, **flags: Any) -> None:
    """Merge CONFIG_FILE into OUT_PATH, taking mergekit-yaml's command line.

    A drop-in for `mergekit-yaml CONFIG OUT [flags]`: the same recipe and flags, streamed
    inside a memory budget (see `streammerge run --help` for streammerge's own command).

    \b
    Example:
      streammerge-yaml examples/ties.yml ./merged --cuda --out-shard-size 2B --random-seed 0
    """
    from .engine import run_merge
    from .recipe import load_recipe

    recipe = load_recipe(config_file)
    options, notes = merge_options(flags, click.get_current_context())
    recipe, seed_note = with_seed(recipe, flags.get("random_seed"))
    for w in recipe.warnings:
        warning(w)
    for line in [*notes, *seed_note]:
        if not flags["quiet"]:
            click.echo(f"note: {line}", err=True)
    if flags.get("num_threads"):
        import torch

        torch.set_num_threads(flags["num_threads"])
    summary = run_merge(recipe, out_path, options)
    if not flags["quiet"]:
        _print_summary(summary)


def merge_options(flags: dict[str, Any], ctx: click.Context) -> tuple[MergeOptions, list[str]]:
    """mergekit's flags as :class:`MergeOptions`, and a note per given flag with no effect."""

    def given(name: str) -> bool:
        src = ctx.get_parameter_source(name)
        return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")

    if flags.get("unsafe_truncate_embeddings"):
        raise StreamMergeError(
            "--unsafe-truncate-embeddings is not supported: streammerge merges models whose "
            "tensors have the same shapes"
        )
    if not flags.get("safe_serialization", True):
        raise StreamMergeError(
            "--no-safe-serialization is not supported: streammerge writes safetensors only"
        )
    device = "cuda" if flags.get("cuda") or flags.get("gpu_rich") else "cpu"
    if flags.get("device"):
        device = flags["device"]
        if device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
            raise StreamMergeError(f"--device {device}: streammerge runs on cpu or cuda")
        device = device.split(":")[0]
    notes = []
    for name, why in NOTES.items():
        if given(name) and flags.get(name) not in (None, False, 0):
            flag = "-v" if name == "verbosity" else "--" + name.replace("_", "-")
            notes.append(f"{flag}: {why}")
    if given("write_model_card") and not flags["write_model_card"]:
        notes.append(f"--no-write-model-card: {NOTES['write_model_card']}")
    if flags.get("gpu_rich"):
        notes.append("--gpu-rich: taken as --cuda (one GPU, chunks staged as they stream)")
    kw: dict[str, Any] = {}
    if flags.get("out_shard_size") is not None:
        kw["shard_size"] = flags["out_shard_size"]
    options = MergeOptions(
        max_memory=flags.get("max_memory"),
        progress=not flags["quiet"],
        quiet=flags["quiet"],
        restart=flags.get("restart", False),
        force=flags.get("force", False),
        allow_nonfinite=flags.get("allow_nonfinite", False),
        device=device,
        copy_tokenizer=flags.get("copy_tokenizer", True),
        **kw,
    )
    return options, notes


def with_seed(recipe: Any, seed: int | None) -> tuple[Any, list[str]]:
    """The recipe with ``--random-seed`` as its method's ``random_seed`` (the recipe's own
    value wins), and a note when the seed has nothing to seed."""
    from .params import parse_value

    if seed is None:
        return recipe, []
    if recipe.impl.spec.param("random_seed") is None:
        return recipe, [f"--random-seed: {recipe.method} draws no random numbers"]
    if "random_seed" in recipe.settings:
        return recipe, ["--random-seed: the recipe's random_seed is used"]
    settings = {**recipe.settings, "random_seed": parse_value(seed, "random_seed", "--random-seed")}
    return replace(recipe, settings=settings), []
