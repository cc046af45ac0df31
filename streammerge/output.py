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

import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .card import CARD_NAME
from .errors import StreamMergeError
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
from .mask_store import STORE_NAME
from .memory import format_size
from .safetensors_io import atomic_write_text, write_index

if TYPE_CHECKING:
    from .model import ModelFolder
    from .plan import MergePlan
    from .recipe import Recipe
    from .results import RunSummary

COMPLETE_MARKER = "streammerge.json"
"""Written last: its presence means the output folder is complete."""
INDEX_NAME = "model.safetensors.index.json"
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied from the base (``config.json`` with the output dtype when one is set)."""
OUR_FILES = (INDEX_NAME, COMPLETE_MARKER, INCOMPLETE, CARD_NAME, *COPIED_FILES)
INCOMPLETE_TEXT = (
    "This merge is not finished. Run the same `streammerge` command (run, remix or add) again\n"
    "to resume it; streammerge.json appears when the output is complete.\n"
)


@dataclass(frozen=True, slots=True)
class FolderState:
    """What an output folder holds, as read without locking or writing."""

    kind: str
    """``new`` (absent), ``empty``, ``interrupted`` or ``finished``."""
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
        if others:
            raise StreamMergeError(
                f"output folder {self.path} is not empty ({others[0]}, ...) and holds no "
                "streammerge run; choose a new folder"
            )
        return FolderState("empty")

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

    def finalize(self, recipe: Recipe, plan: MergePlan, card: str, marker: Mapping) -> None:
        """Files from the base, the index and the card; then the completion marker, last."""
        _copy_model_files(recipe, self.path)
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
        "inputs": {str(f.path): digest(f.fingerprint()) for f in sources},
    }
    if replayed is not None:
        out["masks"] = digest(json.loads(json.dumps(dict(replayed), default=str)))
    return out


def marker(recipe: Recipe, summary: RunSummary, tadrop: Mapping[str, object]) -> dict[str, object]:
    """The completion marker's content."""
    return {
        "streammerge_version": __version__,
        "complete": True,
        "method": recipe.method,
        "tensors": summary.tensors,
        "bytes_read": summary.bytes_read,
        "bytes_written": summary.bytes_written,
        "seconds": round(summary.seconds, 3),
        **({"tadrop": dict(tadrop)} if tadrop else {}),
    }


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where free space is measured)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _copy_model_files(recipe: Recipe, out_dir: Path) -> None:
    """Copy config, generation config and tokenizer files from the base."""
    for name in COPIED_FILES:
        src = recipe.base / name
        if not src.is_file():
            continue
        if name == "config.json" and recipe.out_dtype is not None:
            cfg = json.loads(src.read_text())
            dtype_name = str(recipe.out_dtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = dtype_name
            atomic_write_text(out_dir / name, json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copyfile(src, out_dir / name)
