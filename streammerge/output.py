"""The output folder's owner: what it holds, claiming it for a run, and finishing it.

Life of ``OUT_DIR`` (every step here, nowhere else):

1. :meth:`OutputFolder.check_inputs` - it is not, and is not inside, an input folder;
2. :meth:`OutputFolder.inspect` - read-only: new, empty, interrupted (with the interrupted
   run's header), or finished; a non-empty folder that is none of these is refused
   (``streammerge plan`` stops here);
3. :meth:`OutputFolder.claim` - under an exclusive lock: fresh start or resume (the journal's
   plan digest must match), ``--restart``/``--force`` wipe what a run writes, free disk checked;
4. :meth:`Claim.begin` - the journal's header and ``INCOMPLETE`` (fresh starts only);
5. :meth:`Claim.finalize` - config and tokenizer files from the base, the index, the model
   card, then the completion marker last, then ``INCOMPLETE`` and the journal go.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .card import CARD_NAME
from .checksum import crc32c
from .errors import InputError, StreamMergeError
from .journal import (
    INCOMPLETE,
    STATE_DIR,
    FolderLock,
    Journal,
    Progress,
    digest,
    explain_mismatch,
    fsync_dir,
)
from .mask_store import STORE_NAME, MaskStore
from .memory import format_size
from .model_files import WITH_DTYPE, is_json, looks_copied, model_files, wanted
from .platform import current
from .safetensors_io import atomic_write_text, write_index
from .slices import output_config

if TYPE_CHECKING:
    from .model import ModelFolder
    from .plan import MergePlan
    from .recipe import Recipe
    from .results import RunSummary

COMPLETE_MARKER = "streammerge.json"
"""Written last: its presence means the output folder is complete."""
INDEX_NAME = "model.safetensors.index.json"
OUR_FILES = (INDEX_NAME, COMPLETE_MARKER, INCOMPLETE, CARD_NAME)
"""What a run writes besides the shards, the store and the base's files (``model_files``)."""
INCOMPLETE_TEXT = (
    "This merge is not finished. Run the same `streammerge` command (run, remix or add) again\n"
    "to resume it; streammerge.json appears when the output is complete.\n"
)


@dataclass(frozen=True, slots=True)
class FolderState:
    """What an output folder holds, as read without locking or writing."""

    kind: str
    """``new`` (absent), ``empty``, ``interrupted``, ``finished``, or ``orphaned`` (our
    files without a journal: only ``--restart`` continues)."""
    header: Mapping[str, Any] = field(default_factory=dict)
    """The interrupted run's journal header (plan digest, chunk length, start date)."""

    @property
    def chunk_elems(self) -> int | None:
        """The interrupted run's chunk length: a resume must use the same chunks."""
        x = self.header.get("chunk_elems")
        return x if isinstance(x, int) and not isinstance(x, bool) else None


class OutputFolder:
    """One output folder; see the module docstring for the order of calls."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def check_inputs(self, inputs: Sequence[Path]) -> None:
        """OUT_DIR must not be, or be inside, an input folder (we would shadow our inputs)."""
        out = self.path.resolve()
        for p in inputs:
            p = p.resolve()
            if out == p or p in out.parents:
                raise StreamMergeError(
                    f"output folder {self.path} is inside input model folder {p}"
                )
        if self.path.exists() and not self.path.is_dir():
            raise StreamMergeError(f"output path {self.path} exists and is not a folder")

    def inspect(self) -> FolderState:
        """The folder's state; a non-empty folder that holds no streammerge run is refused."""
        if not self.path.is_dir():
            return FolderState("new")
        if (self.path / COMPLETE_MARKER).exists():
            return FolderState("finished")
        journal = Journal(self.path)
        if journal.exists():
            return FolderState("interrupted", journal.read()[0])
        others = sorted(
            p.name for p in self.path.iterdir() if p.name not in (STATE_DIR, INCOMPLETE)
        )
        foreign = [n for n in others if not _ours(n)]
        if foreign:
            raise StreamMergeError(
                f"output folder {self.path} is not empty ({foreign[0]}, ...) and holds no "
                "streammerge run; choose a new folder"
            )
        # streammerge's files without a journal: a run whose state folder was deleted
        return FolderState("orphaned" if others else "empty")

    def already_done(self, digest: Mapping[str, object]) -> dict[str, Any] | None:
        """For a finished folder: the summary fields of its merge when it is this very merge
        (same plan digest), after clearing what a kill during finalize could leave behind;
        else None."""
        try:
            record = json.loads((self.path / COMPLETE_MARKER).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("digest") != json.loads(
            json.dumps(dict(digest), default=str)
        ):
            return None
        (self.path / INCOMPLETE).unlink(missing_ok=True)
        if not (self.path / STATE_DIR).is_symlink():
            shutil.rmtree(self.path / STATE_DIR, ignore_errors=True)
        return {
            "out_dir": self.path,
            "tensors": record.get("tensors", 0),
            "bytes_read": 0,
            "bytes_written": 0,
            "seconds": 0.0,
            "peak_rss": 0,
            "peak_anon_rss": 0,
            "chunk_elems": record.get("chunk_elems", 0),
            "models": tuple(record.get("models", ())),
        }

    def disk_needed(self, plan: MergePlan) -> int:
        """Bytes still to be written: output shards not yet on disk and the occupancy store
        (one bit per merged element and model; compression only shrinks it)."""
        need = 0
        for s in plan.shards:
            if (self.path / s.filename).exists():
                continue
            partial = self.path / (s.filename + ".partial")
            have = partial.stat().st_blocks * 512 if partial.exists() else 0
            need += max(0, s.size - have)
        if plan.recipe.impl.spec.writes_masks:
            need += sum(t.numel for t in plan.tensors if t.merged) * len(plan.recipe.models) // 8
        return need

    def check_disk(self, plan: MergePlan) -> None:
        """The output and the mask store must fit on the free disk; say how much is missing."""
        need = self.disk_needed(plan)
        free = shutil.disk_usage(_existing(self.path)).free
        if need > free:
            raise StreamMergeError(
                f"not enough disk space in {self.path}: the output and occupancy store need "
                f"{format_size(need)}, {format_size(free)} is free"
            )

    @contextmanager
    def claim(
        self, digest: Mapping[str, object], chunk_elems: int, *, restart: bool, force: bool
    ) -> Iterator[Claim]:
        """Lock the folder and decide between a fresh start and a resume, refusing anything
        that could lose data; ``chunk_elems`` is the plan's (a resume must match it)."""
        self.inspect()  # refuse a foreign folder before creating anything in it
        self._make_state_dir()
        with FolderLock(self.path):
            journal = Journal(self.path)
            try:
                header, done = self._decide(journal, digest, chunk_elems, restart, force)
                yield Claim(self, journal, header, done, digest, chunk_elems)
            finally:
                journal.close()

    def _decide(
        self,
        journal: Journal,
        now: Mapping[str, object],
        chunk_elems: int,
        restart: bool,
        force: bool,
    ) -> tuple[dict[str, Any], Progress]:
        if (self.path / COMPLETE_MARKER).exists():
            if not force:
                raise StreamMergeError(
                    f"{self.path} already holds a finished merge ({COMPLETE_MARKER}); use "
                    "--force to replace it"
                )
            self._wipe()
        if not journal.exists():
            if self.inspect().kind == "orphaned":
                if not restart:
                    raise StreamMergeError(
                        f"{self.path} holds shards of an unfinished merge whose journal "
                        f"({STATE_DIR}) is gone, so they cannot be trusted; use --restart to "
                        "start over"
                    )
                self._wipe()
            return {}, Progress()
        if restart:
            self._wipe()
            return {}, Progress()
        header, done = journal.read()
        now = {**now, "chunk_elems": chunk_elems}
        if any(header.get(k) != v for k, v in now.items()):
            raise StreamMergeError(
                f"{self.path} holds an interrupted merge of a different plan ("
                f"{explain_mismatch(header, now)} changed); use --restart to discard it"
            )
        return header, done

    def _make_state_dir(self) -> None:
        state = self.path / STATE_DIR
        if state.is_symlink() or (state.exists() and not state.is_dir()):
            raise StreamMergeError(
                f"{state} is a link or not a folder; streammerge writes its journal and lock "
                "only inside OUT_DIR: remove it"
            )
        try:
            (self.path / STATE_DIR).mkdir(parents=True, exist_ok=True)
            probe = self.path / STATE_DIR / "write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StreamMergeError(
                f"output folder {self.path} is not writable: {e.strerror}"
            ) from e

    def _wipe(self) -> None:
        """Remove what a streammerge run writes (and nothing else)."""
        for p in self.path.glob("model-*-of-*.safetensors*"):
            p.unlink()
        for name in OUR_FILES:
            (self.path / name).unlink(missing_ok=True)
        for p in self.path.iterdir():  # files copied from a base (which may have changed)
            if wanted(p.name) and (p.is_file() or p.is_symlink()):
                p.unlink()
        shutil.rmtree(self.path / STORE_NAME, ignore_errors=True)
        for p in (self.path / STATE_DIR).glob("journal*"):
            p.unlink()


@dataclass
class Claim:
    """A locked output folder: a fresh start (``done`` empty, no header) or a resume."""

    folder: OutputFolder
    journal: Journal
    header: Mapping[str, Any]
    done: Progress
    digest: Mapping[str, object]
    chunk_elems: int

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def fresh(self) -> bool:
        """Nothing of an earlier run is kept (the mask store is created anew)."""
        return self.done.empty

    @property
    def started(self) -> str:
        """The day the run started (``YYYY-MM-DD``): the card's date, the same on resume."""
        return str(self.header.get("started") or time.strftime("%Y-%m-%d", time.gmtime()))

    def begin(self) -> None:
        """Start the journal (and mark the folder unfinished) unless resuming."""
        if not self.journal.exists():
            self.journal.create(
                {**self.digest, "chunk_elems": self.chunk_elems, "started": self.started}
            )
            atomic_write_text(self.path / INCOMPLETE, INCOMPLETE_TEXT)

    def finalize(
        self,
        recipe: Recipe,
        plan: MergePlan,
        card: str,
        marker: Mapping,
        copy_tokenizer: bool = True,
        extra: Callable[[Path], None] | None = None,
    ) -> None:
        """Files from the base (then ``extra(OUT_DIR)``: the built tokenizer, the chat
        template), the index and the card; then the completion marker, last."""
        copy_model_files(recipe, self.path, copy_tokenizer)
        if extra is not None:
            extra(self.path)
        write_index(self.path, plan.shards, {"streammerge_version": __version__})
        fsync_dir(self.path)
        atomic_write_text(self.path / CARD_NAME, card)
        atomic_write_text(self.path / COMPLETE_MARKER, json.dumps(dict(marker), indent=2))
        (self.path / INCOMPLETE).unlink(missing_ok=True)
        shutil.rmtree(self.path / STATE_DIR, ignore_errors=True)


def plan_digest(
    plan: MergePlan, sources: Sequence[ModelFolder], replayed: Mapping[str, Any] | None = None
) -> dict[str, object]:
    """What a resume must find unchanged: version, recipe, output layout and parameters,
    every input's headers and file stamps, and a replayed store's attributes."""
    layout = [s.header.hex() for s in plan.shards]
    layout += [repr((t.params, t.options)) for t in plan.tensors]
    out: dict[str, object] = {
        "version": __version__,
        "recipe": digest(plan.recipe.source),
        "layout": digest(layout),
        "inputs": {f.ref: digest(f.fingerprint()) for f in sources},
    }
    if replayed is not None:
        out["masks"] = digest(json.loads(json.dumps(dict(replayed), default=str)))
    return out


def marker(
    recipe: Recipe,
    summary: RunSummary,
    tadrop: Mapping[str, object],
    digest: Mapping[str, object],
    shards: Mapping[str, str],
    store: str | None,
) -> dict[str, object]:
    """The completion marker: what was merged, the plan digest a rerun compares with, and the
    SHA-256 of every shard and of the occupancy store (``streammerge verify`` checks them)."""
    return {
        "streammerge_version": __version__,
        "complete": True,
        "method": recipe.method,
        "tensors": summary.tensors,
        "bytes_read": summary.bytes_read,
        "bytes_written": summary.bytes_written,
        "seconds": round(summary.seconds, 3),
        "chunk_elems": summary.chunk_elems,
        "models": list(summary.models),
        "digest": dict(digest),
        "shards": dict(shards),
        "store": store,
        **({"tadrop": dict(tadrop)} if tadrop else {}),
    }


def store_digest(out_dir: Path) -> str | None:
    """SHA-256 over the occupancy store's files (relative paths and bytes, sorted by path);
    None when there is no store."""
    root = out_dir / STORE_NAME
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root).as_posix()).encode() + b"\0")
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def verify_resume(
    plan: MergePlan, done: Progress, out_dir: Path, store: MaskStore | None
) -> list[str]:
    """Trust nothing of an interrupted run that does not check out: a finished shard whose
    SHA-256 differs, a journaled chunk whose bytes in its ``.partial`` (or whose kept counts in
    the mask store) differ from what the journal recorded, a ``.partial`` that is gone. Each is
    forgotten in ``done`` (so it is redone); returns what was found, for the user.

    A ``.partial`` or shard that is a link or not a regular file is refused outright.
    """
    found: list[str] = []
    by_shard: dict[int, list[int]] = {}
    for ti, t in enumerate(plan.tensors):
        by_shard.setdefault(t.shard, []).append(ti)
    for si, sp in enumerate(plan.shards):
        final, partial = out_dir / sp.filename, out_dir / (sp.filename + ".partial")
        for p in (final, partial):
            if p.is_symlink() or (p.exists() and not p.is_file()):
                raise StreamMergeError(f"{p} is not a regular file; rerun with --restart")
        tensors = by_shard.get(si, [])
        if si in done.shards:
            if not final.exists() or file_sha256(final) != done.shard_sha256.get(si):
                found.append(f"{final.name} changed since it was written: redone")
                done.forget_shard(si, tensors)
            continue
        journaled = [(ti, ci) for ti in tensors for ci in sorted(done.chunks.get(ti, ()))]
        if not journaled:
            continue
        if not partial.exists():
            found.append(f"{partial.name} is gone: its {len(journaled)} chunks are redone")
            done.forget_shard(si, tensors)
            continue
        offsets = {t.name: t for t in sp.tensors}
        with partial.open("rb") as f:
            bad = 0
            for ti, ci in journaled:
                task = plan.tensors[ti]
                info = offsets[task.name]
                s, e = task.chunks()[ci]
                f.seek(info.begin + s * info.itemsize)
                data = f.read((e - s) * info.itemsize)
                if crc32c(data) != done.crc.get((ti, ci)):
                    done.forget_chunk(ti, ci)
                    bad += 1
        if bad:
            found.append(f"{partial.name}: {bad} journaled chunks differ from the journal: redone")
    if store is not None and plan.recipe.impl.spec.writes_masks:
        found += _verify_masks(plan, done, store, by_shard)
    return found


def _verify_masks(
    plan: MergePlan, done: Progress, store: MaskStore, by_shard: Mapping[int, list[int]]
) -> list[str]:
    """Journaled chunks whose stored masks no longer count what the journal recorded (in a
    finished shard, the whole shard is redone: the scheduler skips finished shards)."""
    bad = 0
    k = len(plan.recipe.models)
    for ti, task in enumerate(plan.tensors):
        chunks = sorted(done.chunks.get(ti, ()))
        if not task.merged or not chunks:
            continue
        for ci in chunks:
            s, e = task.chunks()[ci]
            want = done.kept.get((ti, ci))
            try:
                got = [
                    int(torch.count_nonzero(store.read_range(m, task.name, s, e))) for m in range(k)
                ]
            except Exception:  # a damaged or missing array or chunk: redo, never trust
                got = None
            if got is None or got != want:
                done.forget_chunk(ti, ci)
                if task.shard in done.shards:
                    done.forget_shard(task.shard, by_shard[task.shard])
                bad += 1
        if ti in done.tensors:
            try:
                total = [store.kept(m, task.name) for m in range(k)]
            except Exception:
                total = None
            sums = [sum(done.kept[(ti, ci)][m] for ci in chunks) for m in range(k)]
            if total != sums:
                done.tensors.discard(ti)
                if task.shard in done.shards:
                    done.forget_shard(task.shard, by_shard[task.shard])
    return [f"occupancy store: {bad} journaled mask chunks differ from the journal: redone"] * (
        bad > 0
    )


def _ours(name: str) -> bool:
    """Whether a file name in OUT_DIR is one a streammerge run writes."""
    return (
        name in OUR_FILES
        or looks_copied(name.removesuffix(".partial"))
        or name == STORE_NAME
        or re.fullmatch(r"model-\d+-of-\d+\.safetensors(\.partial)?", name) is not None
    )


def check_not_inside(path: Path, inputs: Sequence[Path], what: str) -> None:
    """Refuse a path the run would write (``--log-json``) that is, or lies inside, an input."""
    target = path.resolve()
    for p in inputs:
        p = p.resolve()
        if target == p or p in target.parents:
            raise StreamMergeError(f"{what} {path} is inside input model folder {p}")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where free space is measured)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_model_files(recipe: Recipe, copy_tokenizer: bool = True) -> list[str]:
    """The files a merge will copy from the base (their names, sorted) must be readable, and
    the JSON ones valid: found before the merge rather than at finalize, after all the work."""
    names = []
    for src in model_files(recipe.base, copy_tokenizer):
        if src.is_symlink() and not src.exists():
            raise InputError(f"{src}: a broken link")
        if not src.is_file():
            continue
        try:
            if is_json(src.name):
                cfg = json.loads(src.read_bytes())
                if (
                    src.name == "config.json"
                    and recipe.slices is not None
                    and isinstance(cfg, dict)
                ):
                    output_config(recipe, cfg)  # a layer list that cannot follow: now
            else:
                with src.open("rb"):
                    pass
        except OSError as e:
            raise InputError(f"{src}: cannot read: {e.strerror}") from None
        except ValueError as e:
            raise InputError(f"{src}: invalid JSON ({e})") from None
        names.append(src.name)
    return names


def copy_model_files(recipe: Recipe, out_dir: Path, copy_tokenizer: bool = True) -> list[str]:
    """Copy what loading needs from the base (:mod:`.model_files`), ``config.json`` with the
    output dtype; returns the names copied. Each file is written under a temporary name and
    renamed, so a link already at the destination is replaced, never written through."""
    copied = []
    for src in model_files(recipe.base, copy_tokenizer):
        if not src.is_file():
            continue
        dst = out_dir / src.name
        if src.name == WITH_DTYPE and (recipe.out_dtype is not None or recipe.slices is not None):
            cfg = json.loads(src.read_text())
            if recipe.out_dtype is not None:
                dtype_name = str(recipe.out_dtype).removeprefix("torch.")
                # as mergekit: the config names the output dtype. transformers 5 writes "dtype",
                # 4.x "torch_dtype" (both read either); a config with neither gets 4.x's key
                keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
                for key in keys:
                    cfg[key] = dtype_name
            if recipe.slices is not None:  # layer count and per-layer lists follow the slices
                cfg = output_config(recipe, cfg)
            atomic_write_text(dst, json.dumps(cfg, indent=2) + "\n")
        else:
            tmp = dst.with_name(dst.name + ".partial")
            tmp.unlink(missing_ok=True)
            shutil.copyfile(src, tmp)
            current().replace(tmp, dst)
        copied.append(src.name)
    return copied
