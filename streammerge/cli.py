"""Command line: a thin click layer over :func:`streammerge.run_merge`.

User mistakes (:class:`StreamMergeError`) exit with status 2 and one line on stderr; pass
``--verbose`` for the traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .device import DEVICES
from .engine import DEFAULT_SHARD_SIZE, RunSummary, run_merge
from .errors import Interrupted, StreamMergeError
from .memory import format_size, parse_size
from .recipe import load_recipe


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn StreamMergeError into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, verbose: bool = False, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            click.echo(str(e), err=True)
            sys.exit(128 + e.signum)
        except StreamMergeError as e:
            if verbose:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return click.option("--verbose", is_flag=True, help="Show tracebacks for errors.")(wrapper)


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except StreamMergeError as e:
        raise click.BadParameter(str(e)) from e


@click.group()
@click.version_option(__version__, prog_name="streammerge")
def main() -> None:
    """Merge large models out of core, inside a RAM budget."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--max-memory",
    callback=_size,
    metavar="SIZE",
    help="Peak RSS budget, e.g. 1GiB (default: half the available RAM).",
)
@click.option(
    "--shard-size",
    callback=_size,
    metavar="SIZE",
    default=str(DEFAULT_SHARD_SIZE),
    show_default="5GB",
    help="Maximum size of one output shard.",
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--chunk-elems", type=int, hidden=True, help="Force the chunk length (testing).")
@click.option("--restart", is_flag=True, help="Discard an interrupted run in OUT_DIR; start over.")
@click.option("--force", is_flag=True, help="Replace a finished merge in OUT_DIR.")
@click.option(
    "--allow-nonfinite", is_flag=True, help="Merge NaN/Inf input values instead of failing."
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="cpu",
    show_default=True,
    help="Where the math runs; auto = cuda when a GPU is usable (same bytes either way).",
)
@click.option(
    "--max-vram",
    callback=_size,
    metavar="SIZE",
    help="Peak GPU memory budget with --device cuda (default: 90% of the free VRAM).",
)
@_user_errors
def run(
    recipe: Path,
    out_dir: Path,
    max_memory: int | None,
    shard_size: int,
    progress: bool,
    restart: bool,
    force: bool,
    allow_nonfinite: bool,
    chunk_elems: int | None,
    device: str,
    max_vram: int | None,
) -> None:
    """Merge the models of RECIPE (mergekit-style YAML) into OUT_DIR.

    An interrupted run (Ctrl-C, a crash, a kill) resumes where it stopped when the same
    command is run again, and produces the same bytes as an uninterrupted run.

    \b
    Example:
      streammerge run recipe.yaml merged/ --max-memory 1GiB
    """
    parsed = load_recipe(recipe)
    for w in parsed.warnings:  # before the heavy work, so a typo is seen at once
        click.echo(f"warning: {w}", err=True)
    summary = run_merge(
        parsed,
        out_dir,
        max_memory=max_memory,
        shard_size=shard_size,
        progress=progress,
        restart=restart,
        force=force,
        allow_nonfinite=allow_nonfinite,
        chunk_elems=chunk_elems,
        device=device,
        max_vram=max_vram,
    )
    _print_summary(summary)


@main.command()
@click.argument(
    "directory",
    required=False,
    default="streammerge-demo",
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option("--max-memory", callback=_size, metavar="SIZE", default="1GiB", show_default=True)
@_user_errors
def demo(directory: Path, max_memory: int) -> None:
    """Generate a tiny Llama-shaped base + 2 fine-tunes in DIRECTORY and merge them with CABS.

    \b
    Example:
      streammerge demo /tmp/sm-demo
    """
    from .synth import generate_family

    if (directory / "merged").exists():
        raise StreamMergeError(f"{directory / 'merged'} already exists; pick a new DIRECTORY")
    base, fts = generate_family(directory / "models", "tiny", n_finetunes=2)
    recipe = directory / "recipe.yaml"
    recipe.write_text(DEMO_RECIPE.format(base=base, ft1=fts[0], ft2=fts[1]))
    click.echo(f"wrote a tiny model family to {directory / 'models'} and {recipe}")
    _print_summary(run_merge(recipe, directory / "merged", max_memory=max_memory, progress=True))


DEMO_RECIPE = """\
# CABS: conflict-aware n:m sparsification; ft1 is pruned first and claims its positions.
merge_method: cabs
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
  - model: {ft2}
    parameters: {{weight: 0.8}}
parameters:
  n_val: 16
  m_val: 64
dtype: float32
"""


def _print_summary(s: RunSummary) -> None:
    rate = s.bytes_read / s.seconds if s.seconds else 0.0
    click.echo(
        f"merged {s.tensors} tensors in {s.seconds:.1f} s: read {format_size(s.bytes_read)} "
        f"({format_size(rate)}/s), wrote {format_size(s.bytes_written)}; "
        f"peak RSS {format_size(s.peak_rss)} (anonymous {format_size(s.peak_anon_rss)}); "
        f"output: {s.out_dir}"
    )
    if s.resumed_chunks:
        click.echo(f"resumed: {s.resumed_chunks} chunks of {s.total_chunks} were already done")
    if s.kept and s.merged_elems:
        kept = [sum(v[k] for v in s.kept.values()) for k in range(len(s.models))]
        click.echo(
            "kept (density): "
            + ", ".join(
                f"{name} {n / s.merged_elems:.4f}" for name, n in zip(s.models, kept, strict=True)
            )
        )


if __name__ == "__main__":
    main()
