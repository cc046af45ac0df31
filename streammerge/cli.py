"""Command line: a thin click layer over the library (:func:`streammerge.run_merge`,
:func:`streammerge.planning.describe_plan`).

User mistakes (:class:`StreamMergeError`) exit with status 2 and one line on stderr; pass
``--verbose`` for the traceback. "error:" and "warning:" are coloured only on a terminal.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from . import __version__
from .defaults import DEFAULT_SHARD_SIZE_TEXT, DEVICES, EXECUTORS
from .errors import Interrupted, StreamMergeError
from .memory import format_size, parse_size
from .options import MergeOptions

if TYPE_CHECKING:  # torch and numba load only when a command runs, so --help stays fast
    from .engine import RunSummary, TensorReport
    from .planning import PlanReport


def error(message: str) -> None:
    """'error: ...' on stderr, red on a terminal (click strips the colour elsewhere)."""
    click.echo(click.style("error:", fg="red", bold=True) + f" {message}", err=True, color=None)


def warning(message: str) -> None:
    """'warning: ...' on stderr, yellow on a terminal."""
    click.echo(click.style("warning:", fg="yellow") + f" {message}", err=True, color=None)


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
            error(str(e))
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


class _Commands(click.Group):
    """A group that answers ``streammerge recipe.yaml OUT`` (mergekit's habit) with the command
    to use instead of click's bare "No such command"."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name not in self.commands and (name.endswith((".yaml", ".yml")) or Path(name).is_file()):
            rest = " ".join(args[1:2]) or "OUT_DIR"
            raise click.UsageError(
                f"{name!r} is not a command; to merge a recipe run: streammerge run {name} {rest}"
                f" (or, with mergekit-yaml's flags: streammerge-yaml {name} {rest})",
                ctx,
            )
        return super().resolve_command(ctx, args)


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="streammerge")
def main() -> None:
    """Merge large models out of core, inside a RAM budget."""


def _merge_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """RECIPE, OUT_DIR and the options that shape the plan: shared by ``run`` and ``plan``."""
    for option in reversed(
        [
            click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path)),
            click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path)),
            click.option(
                "--max-memory",
                callback=_size,
                metavar="SIZE",
                help="Peak RSS budget, e.g. 1GiB (default: half the available RAM).",
            ),
            click.option(
                "--shard-size",
                callback=_size,
                metavar="SIZE",
                default=DEFAULT_SHARD_SIZE_TEXT,
                show_default=True,
                help="Maximum size of one output shard.",
            ),
            click.option(
                "--chunk-elems", type=int, hidden=True, help="Force the chunk length (testing)."
            ),
            click.option(
                "--device",
                type=click.Choice(DEVICES),
                default="cpu",
                show_default=True,
                help="Where the math runs; auto = cuda when a GPU is usable, else mps on "
                "Apple silicon, for methods that run there (same bytes either way).",
            ),
            click.option(
                "--max-vram",
                callback=_size,
                metavar="SIZE",
                help="Peak GPU memory budget with --device cuda (default: 90% of the free VRAM).",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@main.command()
@_merge_options
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option(
    "--quiet", "-q", is_flag=True, help="No progress bar and no summary (warnings and errors only)."
)
@click.option(
    "--log-json",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Append one JSON line per tensor to FILE as it finishes.",
)
@click.option("--restart", is_flag=True, help="Discard an interrupted run in OUT_DIR; start over.")
@click.option("--force", is_flag=True, help="Replace a finished merge in OUT_DIR.")
@click.option(
    "--allow-nonfinite", is_flag=True, help="Merge NaN/Inf input values instead of failing."
)
@click.option(
    "--executor",
    type=click.Choice(EXECUTORS),
    default="local",
    show_default=True,
    help="local: this process; ray: work units as Ray tasks on a cluster (same bytes; needs "
    "streammerge[ray], shared storage, --max-memory is per worker).",
)
@click.option(
    "--ray-address",
    metavar="ADDR",
    help="The Ray cluster to join with --executor ray (default: RAY_ADDRESS, else a new local "
    "instance).",
)
@_user_errors
def run(
    recipe: Path,
    out_dir: Path,
    max_memory: int | None,
    shard_size: int,
    progress: bool,
    quiet: bool,
    log_json: Path | None,
    restart: bool,
    force: bool,
    allow_nonfinite: bool,
    chunk_elems: int | None,
    device: str,
    max_vram: int | None,
    executor: str,
    ray_address: str | None,
) -> None:
    """Merge the models of RECIPE (mergekit-style YAML) into OUT_DIR.

    An interrupted run (Ctrl-C, a crash, a kill) resumes where it stopped when the same
    command is run again, and produces the same bytes as an uninterrupted run. OUT_DIR gets
    a model card (README.md) describing the merge.

    \b
    Example:
      streammerge run recipe.yaml merged/ --max-memory 1GiB --log-json merge.jsonl
    """
    from .engine import run_merge
    from .recipe import load_recipe

    parsed = load_recipe(recipe)
    for w in parsed.warnings:  # before the heavy work, so a typo is seen at once
        warning(w)
    if log_json is not None:  # never append to an input's file
        from .output import check_not_inside

        inputs = [parsed.base, *(m.path for m in parsed.models)]
        inputs += [a for a in (parsed.base_adapter, *(m.adapter for m in parsed.models)) if a]
        check_not_inside(log_json, inputs, "--log-json")
    log = _open_log(log_json) if log_json is not None else None
    try:
        options = MergeOptions(
            max_memory=max_memory,
            shard_size=shard_size,
            chunk_elems=chunk_elems,
            progress=progress and not quiet,
            restart=restart,
            force=force,
            allow_nonfinite=allow_nonfinite,
            device=device,
            max_vram=max_vram,
            executor=executor,
            ray_address=ray_address,
            quiet=quiet,
        )
        on_tensor = None if log is None else functools.partial(_log_tensor, log)
        summary = run_merge(parsed, out_dir, options, on_tensor=on_tensor)
    finally:
        if log is not None:
            log.close()
    if not quiet:
        _print_summary(summary)


def _open_log(path: Path) -> IO[str]:
    try:
        return path.open("a")
    except OSError as e:
        raise StreamMergeError(f"--log-json {path}: {e.strerror}") from e


def _log_tensor(log: IO[str], report: TensorReport) -> None:
    """One JSON line per tensor, flushed at once so a crash or kill loses none."""
    entry = asdict(report)
    entry["seconds"] = round(report.seconds, 4)
    entry["kept"] = list(report.kept) if report.kept is not None else None
    log.write(json.dumps(entry) + "\n")
    log.flush()


@main.command()
@_merge_options
@click.option("--tensors", is_flag=True, help="Also list every tensor and its chunking.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (tensors included).")
@click.option(
    "--calibrate/--no-calibrate",
    default=True,
    help="Time the method and the disk (about 2 s) for a wall-time estimate.",
)
@_user_errors
def plan(
    recipe: Path,
    out_dir: Path,
    max_memory: int | None,
    shard_size: int,
    chunk_elems: int | None,
    device: str,
    max_vram: int | None,
    tensors: bool,
    as_json: bool,
    calibrate: bool,
) -> None:
    """Check RECIPE and show what `run` would do with OUT_DIR, writing nothing.

    Runs the checks `run` makes before any work (recipe, input headers, output folder, free
    disk) and prints the plan: tensors merged and copied, their chunks, predicted peak RSS,
    disk needed and an estimated wall time from a short calibration on this machine.

    \b
    Example:
      streammerge plan recipe.yaml merged/ --max-memory 1GiB --tensors
    """
    from .planning import describe_plan
    from .recipe import load_recipe

    parsed = load_recipe(recipe)
    options = MergeOptions(max_memory=max_memory, shard_size=shard_size, chunk_elems=chunk_elems,
                           device=device, max_vram=max_vram)  # fmt: skip
    report = describe_plan(parsed, out_dir, options, calibrate=calibrate)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for w in report.warnings:
            warning(w)
        _print_plan(report, tensors)
    if not report.disk_ok:
        raise StreamMergeError(
            f"not enough disk space in {out_dir}: the output and occupancy store need "
            f"{format_size(report.disk_needed)}, {format_size(report.disk_free)} is free"
        )


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
    from .engine import run_merge
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


def _print_plan(r: PlanReport, tensors: bool) -> None:
    """The plan for people; ``--json`` prints :meth:`PlanReport.to_dict` instead."""
    click.echo(
        f"plan: {r.method} merge of {len(r.models)} model(s) onto {r.base} into {r.out_dir} "
        "(nothing written)"
    )
    click.echo(
        f"tensors: {r.merged} merged, {r.copied} copied; {r.chunks} chunks of up to "
        f"{r.chunk_elems:,} elements; {r.shards} output shard(s)"
    )
    click.echo(f"dtypes: {r.dtypes}")
    for line in r.slices:
        click.echo(line)
    click.echo(f"read: {format_size(r.bytes_read)}; write: {format_size(r.bytes_written)}")
    click.echo(
        f"peak RSS (predicted): {format_size(r.predicted_peak_rss)} "
        f"(budget {format_size(r.max_memory)})"
    )
    vram = "n/a (cpu)" if r.predicted_peak_vram is None else format_size(r.predicted_peak_vram)
    click.echo(f"device: {r.device}; peak VRAM: {vram}")
    for line in r.stats:
        click.echo(f"statistics pass: {line}")
    if r.vocabulary is not None:
        click.echo(f"vocabulary: {r.vocabulary}")
    click.echo(
        f"disk: {format_size(r.disk_needed)} needed (shards and occupancy store), "
        f"{format_size(r.disk_free)} free"
    )
    c = r.calibration
    if r.estimated_seconds is not None and c is not None:
        click.echo(
            f"time (estimated): {r.estimated_seconds:.0f} s (method {c.merge_elems_per_s / 1e6:.1f}"
            f" M elements/s, read {format_size(c.read_bytes_per_s)}/s; calibrated in "
            f"{c.seconds:.1f} s)"
        )
    if tensors:
        width = max((len(t.name) for t in r.tensors), default=6)
        head = f"{'tensor':<{width}}  {'shape':<18} {'action':<6} {'chunk':>12} {'chunks':>6}"
        click.echo(f"\n{head}")
        for t in r.tensors:
            shape = "x".join(map(str, t.shape)) or "()"
            action = "merge" if t.merged else "copy"
            click.echo(
                f"{t.name:<{width}}  {shape:<18} {action:<6} {t.chunk_elems:>12,} {t.chunks:>6}"
            )


def _print_summary(s: RunSummary) -> None:
    if s.up_to_date:
        click.echo(f"{s.out_dir} already holds this merge, complete; nothing to do")
        return
    for line in s.repaired:
        warning(f"resume: {line}")
    rate = s.bytes_read / s.seconds if s.seconds else 0.0
    click.echo(
        f"merged {s.tensors} tensors in {s.seconds:.1f} s: read {format_size(s.bytes_read)} "
        f"({format_size(rate)}/s), wrote {format_size(s.bytes_written)}; "
        f"peak RSS {format_size(s.peak_rss)} (anonymous {format_size(s.peak_anon_rss)}); "
        f"output: {s.out_dir}"
    )
    if s.compile_seconds >= 0.05:
        click.echo(f"kernels compiled in {s.compile_seconds:.1f} s first (not in the time above)")
    if s.files:
        click.echo(f"copied from the base: {', '.join(s.files)}")
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


def _grid(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    out: dict[str, list[float]] = {}
    for v in values:
        ref, sep, nums = v.rpartition("=")
        try:
            if not sep or not ref:
                raise ValueError
            out[ref] = [float(x) for x in nums.split(",")]
        except ValueError:
            raise click.BadParameter(f"expected MODEL=V1,V2,..., got {v!r}") from None
    return out


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_root", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--grid",
    multiple=True,
    required=True,
    metavar="MODEL=V1,V2,...",
    callback=_grid,
    help="Weights to try for a model (folder name or path as in the recipe); repeatable: "
    "the points are every combination.",
)
@click.option("--max-memory", callback=_size, metavar="SIZE",
              help="Peak RSS budget of each merge (default: half the available RAM).")  # fmt: skip
@click.option("--shard-size", callback=_size, metavar="SIZE", default=DEFAULT_SHARD_SIZE_TEXT,
              show_default=True, help="Maximum size of one output shard.")  # fmt: skip
@click.option("--jobs", "-j", type=click.IntRange(1), default=2, show_default=True,
              help="Merges at once (local processes).")  # fmt: skip
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
              help="ray: the first merge on Ray, the others one Ray task each.")  # fmt: skip
@click.option("--ray-address", metavar="ADDR", help="The Ray cluster to join (with ray).")
@click.option("--chunk-elems", type=int, hidden=True, help="Force the chunk length (testing).")
@_user_errors
def sweep(
    recipe: Path,
    out_root: Path,
    grid: dict[str, list[float]],
    max_memory: int | None,
    shard_size: int,
    jobs: int,
    executor: str,
    ray_address: str | None,
    chunk_elems: int | None,
) -> None:
    """Merge RECIPE once per point of a weight grid, into OUT_ROOT/point-NNN.

    For methods whose masks do not depend on the weights (CABS) the first point is a full
    run and the others replay its masks; each output is a normal finished merge.

    \b
    Example:
      streammerge sweep recipe.yaml sweep/ --grid ft1=0.5,1.0 --grid ft2=0.5,1.0
    """
    from .recipe import load_recipe
    from .sweep import sweep as run_sweep

    parsed = load_recipe(recipe)
    for w in parsed.warnings:
        warning(w)
    options = MergeOptions(max_memory=max_memory, shard_size=shard_size, chunk_elems=chunk_elems,
                           executor=executor, ray_address=ray_address)  # fmt: skip

    def line(point: Any, summary: Any) -> None:
        how = "replayed" if point.replayed else "full run"
        click.echo(f"{point.out_dir.name}: {how}, {summary.seconds:.1f} s", err=True)

    results = run_sweep(parsed, out_root, grid, options, jobs=jobs, on_point=line)
    names = [name for name, _ in results[0][0].weights]
    click.echo("| folder | " + " | ".join(names) + " |")
    click.echo("|---|" + "---|" * len(names))
    for point, _ in results:
        click.echo(f"| {point.out_dir} | " + " | ".join(f"{w:g}" for _, w in point.weights) + " |")


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
                         default=DEFAULT_SHARD_SIZE_TEXT, show_default=True,
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

    _print_summary(remix_merge(out_dir, new_out, weights, MergeOptions(**run_opts)))


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

    options = MergeOptions(**run_opts)
    _print_summary(add_model(out_dir, new_out, model, weight, options, n_val=n_val, m_val=m_val))


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


@main.command()
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shard-size", callback=_size, metavar="SIZE", default="5GB", show_default=True,
              help="Largest output shard (a larger tensor gets its own).")  # fmt: skip
@_user_errors
def convert(src: Path, out: Path, shard_size: int) -> None:
    """Convert a pickle checkpoint folder (pytorch_model.bin, sharded .bin with its index, or a
    PEFT adapter's adapter_model.bin) into a new safetensors folder OUT.

    Pickles are opened with torch's restricted loader (weights_only=True): one holding more
    than tensors is refused, never run. One .bin is mapped at a time; OUT appears only when
    complete. Config, tokenizer and other top-level files are copied; tied weights are written
    once (as transformers saves them).

    \b
    Example:
      streammerge convert ./my-model-bin ./my-model
    """
    from .convert import ConvertOptions, convert_checkpoint

    s = convert_checkpoint(src, out, ConvertOptions(shard_size=shard_size))
    click.echo(
        f"{s.out_dir}: {s.tensors} tensors, {len(s.shards)} shard"
        f"{'s' if len(s.shards) != 1 else ''}, {format_size(s.bytes_written)}"
    )
    for dropped, kept in s.tied:
        click.echo(f"tied: {dropped} is {kept} (written once, as {kept})")
    if s.copied:
        click.echo(f"copied: {', '.join(s.copied)}")
    if s.skipped:
        click.echo(f"left out: {', '.join(s.skipped)}")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--inputs", is_flag=True, help="Also check the inputs still match their fingerprints."
)
@_user_errors
def verify(out_dir: Path, inputs: bool) -> None:
    """Check that OUT_DIR still holds exactly what the merge wrote (shard and store digests).

    Exit status 0 only when everything matches; 1 with one error line per difference.

    \b
    Example:
      streammerge verify merged/ --inputs
    """
    from .verify import verify_output

    report = verify_output(out_dir, inputs=inputs)
    for problem in report.problems:
        error(problem)
    if not report.ok:
        sys.exit(1)
    extra = f", {report.inputs} input folders" if inputs else ""
    store = ", occupancy store" if report.store else ""
    click.echo(f"{out_dir}: ok ({report.shards} shards{store}{extra} match)")


if __name__ == "__main__":
    main()
