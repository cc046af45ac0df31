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


# --- re-merging from the occupancy store: remix, add, inspect ---------------------------------


def _weight_pair(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    out: dict[str, float] = {}
    for v in values:
        ref, sep, num = v.rpartition("=")
        try:
            if not sep or not ref:
                raise ValueError
            out[ref] = float(num)
        except ValueError:
            raise click.BadParameter(f"expected MODEL=VALUE, got {v!r}") from None
    return out


def _replay_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The run options that make sense for remix and add."""
    for opt in reversed(
        [
            click.option("--max-memory", callback=_size, metavar="SIZE",
                         help="Peak RSS budget, e.g. 1GiB (default: half the available RAM)."),
            click.option("--shard-size", callback=_size, metavar="SIZE",
                         default=str(DEFAULT_SHARD_SIZE), show_default="5GB",
                         help="Maximum size of one output shard (use the original run's for "
                         "byte-identical shards)."),
            click.option("--progress/--no-progress", default=True, help="Show a progress bar."),
            click.option("--chunk-elems", type=int, hidden=True, help="Force the chunk length."),
            click.option("--restart", is_flag=True,
                         help="Discard an interrupted run in NEW_OUT; start over."),
            click.option("--force", is_flag=True, help="Replace a finished merge in NEW_OUT."),
            click.option("--allow-nonfinite", is_flag=True,
                         help="Merge NaN/Inf input values instead of failing."),
        ]
    ):  # fmt: skip
        fn = opt(fn)
    return fn


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("new_out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--weight",
    "weights",
    multiple=True,
    required=True,
    metavar="MODEL=VALUE",
    callback=_weight_pair,
    help="New weight of a model (folder name or path as in the recipe); repeatable.",
)
@_replay_options
@_user_errors
def remix(out_dir: Path, new_out: Path, weights: dict[str, float], **run_opts: Any) -> None:
    """Re-merge the CABS merge in OUT_DIR with new weights into NEW_OUT, reusing its masks.

    No selection work: reads the base, the fine-tunes and the stored masks. NEW_OUT is
    byte-identical to a full `run` with the new weights (same --shard-size).

    \b
    Example:
      streammerge remix merged/ remixed/ --weight llama-3b-code=0.6
    """
    from .remix import remix_merge

    _print_summary(remix_merge(out_dir, new_out, weights, **run_opts))


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("new_out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "model", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The fine-tune to add (pruned last).")  # fmt: skip
@click.option("--weight", type=float, required=True, help="Its weight.")
@click.option("--n-val", type=int, help="Its n (default: the recipe's).")
@click.option("--m-val", type=int, help="Its m (default: the recipe's).")
@_replay_options
@_user_errors
def add(
    out_dir: Path,
    new_out: Path,
    model: Path,
    weight: float,
    n_val: int | None,
    m_val: int | None,
    **run_opts: Any,
) -> None:
    """Add one fine-tune, last in pruning order, to the strict CABS merge in OUT_DIR.

    Reads only the base, the new model, OUT_DIR's shards and its occupancy store. NEW_OUT is
    byte-identical to a full `run` of the extended recipe (same --shard-size).

    \b
    Example:
      streammerge add merged/ merged-3/ --model ./llama-3b-chat --weight 0.7
    """
    from .remix import add_model

    _print_summary(add_model(out_dir, new_out, model, weight, n_val=n_val, m_val=m_val, **run_opts))


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tensors", is_flag=True, help="One row per tensor instead of per layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@click.option(
    "--no-inputs", is_flag=True, help="Skip the independent n:m overlap (no input reads)."
)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Draw per-layer densities and overlaps (needs matplotlib).")  # fmt: skip
@_user_errors
def inspect(
    out_dir: Path, tensors: bool, as_json: bool, no_inputs: bool, plot: Path | None
) -> None:
    """Report what the merge in OUT_DIR kept, per layer (or per tensor), from its masks.

    Kept density per model, the overlap between models (0 under CABS strict), and, for CABS,
    the overlap that independent n:m pruning would have had, computed by streaming the inputs
    (skipped with --no-inputs or when they are gone).

    \b
    Example:
      streammerge inspect merged/ --plot merged.png
    """
    import json

    from .inspect import format_report, inspect_merge, plot_report

    if plot is not None:  # fail on a missing matplotlib before reading anything
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise StreamMergeError(
                "--plot needs matplotlib: pip install 'streammerge[plot]' (or pip install "
                "matplotlib)"
            ) from None
    report = inspect_merge(out_dir, use_inputs=not no_inputs)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report, tensors=tensors))
    if plot is not None:
        plot_report(report, plot)
        click.echo(f"plot: {plot}", err=as_json)


if __name__ == "__main__":
    main()
