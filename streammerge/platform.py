"""Every OS-specific call streammerge makes, in one place, with the right primitive per OS.

The rest of the package calls a :class:`Platform` (usually :func:`current`) and never touches
``fcntl``, ``msvcrt``, ``madvise`` constants, ``fdatasync`` or libc directly. Each OS is an
object (:data:`LINUX`, :data:`MACOS`, :data:`WINDOWS`) rather than ``if sys.platform`` checks
scattered through the code, so tests on one machine can select every branch explicitly; only
the fallbacks that need a missing primitive degrade (``getattr`` on optional constants).

Primitive: Linux / macOS / Windows

* durable flush: ``fdatasync`` / ``F_FULLFSYNC`` (1) / ``fsync`` (FlushFileBuffers)
* directory sync: ``fsync`` of the directory / same / none (NTFS journals renames)
* folder lock: ``flock`` / ``flock`` / an ``O_EXCL`` lock file holding the pid
* mapped input pages: one map per file + ``MADV_DONTNEED`` / one map per chunk (2) / same
* sequential-read hint: ``MADV_SEQUENTIAL`` / same / none
* heap trimming: glibc ``malloc_trim`` / none / none
* atomic replace: ``os.replace`` / same / ``os.replace`` retried on sharing violations
* positional I/O: ``pread``/``pwrite`` / same / seek + read/write under a lock
* peak RSS (host-dispatched): ``ru_maxrss`` KiB / ``ru_maxrss`` bytes / peak working set

(1) macOS ``fsync`` leaves data in the drive's cache; ``F_FULLFSYNC`` flushes it (falling back
to ``fsync`` where a filesystem refuses it).
(2) Darwin's ``MADV_DONTNEED`` only deactivates pages and ``MADV_FREE`` is for anonymous memory,
so neither reliably shrinks the RSS of a file mapping; Windows has no advice at all. There,
readers map one window per chunk instead, unmapped when its last view is dropped, which bounds
RSS by the chunks alive (what ``--max-memory`` plans for).

``STREAMMERGE_PLATFORM=linux|macos|windows`` makes :func:`current` return that implementation
for the whole process, so the resume, kill and memory tests can run with the non-Linux
fallbacks forced on a Linux machine. Forcing one whose primitives the host lacks (``linux`` on
a Mac: no ``fdatasync``) fails at the first call; it is a testing knob, not a setting.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import StreamMergeError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

ENV = "STREAMMERGE_PLATFORM"
"""Environment variable that forces one implementation for the whole process."""

BINARY = getattr(os, "O_BINARY", 0)
"""``os.open`` flag that stops Windows' C runtime from translating newlines (0 elsewhere)."""

STALE_EMPTY_LOCK_S = 10.0
"""A lock file still without a pid after this long was left by a crash during its creation."""

_SEEK_IO = threading.Lock()
"""Serialises seek + read/write pairs on platforms without ``pread``/``pwrite``."""


class LockHeld(StreamMergeError):
    """Another process (or this one) holds the lock."""

    def __init__(self, path: Path, pid: int | None = None) -> None:
        who = f" by process {pid}" if pid is not None else ""
        super().__init__(f"{path} is locked{who}")
        self.path = path
        self.pid = pid


class HeldLock:
    """A lock acquired by :meth:`Platform.lock`; :meth:`release` is idempotent."""

    def release(self) -> None:
        raise NotImplementedError


class _FlockLock(HeldLock):
    """``flock`` on an open descriptor: the kernel drops it when the process dies."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing releases the lock
            self._fd = -1


class _FileLock(HeldLock):
    """A lock file created with ``O_EXCL`` and holding ``pid token``; removed on release."""

    def __init__(self, path: Path, content: bytes) -> None:
        self.path = path
        self._content: bytes | None = content

    def release(self) -> None:
        if self._content is None:
            return
        # only remove it if it is still ours (a caller may have deleted the folder meanwhile)
        with contextlib.suppress(OSError):
            if self.path.read_bytes() == self._content:
                self.path.unlink()
        self._content = None


@dataclass(frozen=True)
class Platform:
    """The OS-specific primitives of one operating system (subclassed per OS)."""

    name: str
    windowed_maps: bool
    """Readers map one window per chunk (no advice releases file pages reliably here)."""

    # -- durability ----------------------------------------------------------------------------

    def data_sync(self, fd: int) -> None:
        """Make a file's data durable (metadata only as far as needed to read it back)."""
        self.full_sync(fd)

    def full_sync(self, fd: int) -> None:
        """Make a file's data and metadata durable."""
        os.fsync(fd)

    def sync_file(self, path: Path) -> None:
        """:meth:`full_sync` a file by path (for files written by libraries that never sync)."""
        fd = os.open(path, os.O_RDONLY | BINARY)
        try:
            self.full_sync(fd)
        finally:
            os.close(fd)

    def sync_dir(self, path: Path) -> None:
        """Make creations and renames in ``path`` durable."""
        self.sync_file(path)

    def replace(self, src: Path, dst: Path) -> None:
        """Atomically rename ``src`` over ``dst``."""
        os.replace(src, dst)

    # -- locking -------------------------------------------------------------------------------

    def wait_lock(self, path: Path) -> HeldLock | None:
        """Wait for an exclusive lock on the existing file or folder ``path`` (``flock``);
        None where the OS has none (Windows: one process writes such files there)."""
        if fcntl is None:
            return None
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _FlockLock(fd)

    def lock(self, path: Path) -> HeldLock:
        """Take an exclusive, non-blocking lock on ``path``; :class:`LockHeld` if taken."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | BINARY, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(path) from None
        return _FlockLock(fd)

    # -- memory --------------------------------------------------------------------------------

    def advise_sequential(self, mm: mmap.mmap) -> None:
        """Ask for aggressive read-ahead on a mapping that is read front to back."""
        advice = getattr(mmap, "MADV_SEQUENTIAL", None)
        if advice is not None and hasattr(mm, "madvise"):
            mm.madvise(advice)

    def release_pages(self, mm: mmap.mmap, offset: int, length: int) -> None:
        """Drop a consumed range of a whole-file mapping from RSS (no-op with windowed maps)."""

    def map_window(self, fd: int, offset: int, length: int) -> tuple[mmap.mmap, int]:
        """Privately map the bytes ``[offset, offset + length)`` of ``fd``.

        Returns the mapping and where ``offset`` lies in it (windows start on an allocation
        granule: 64 KiB on Windows, a page elsewhere). Dropping the mapping unmaps it.
        """
        lo = offset - offset % mmap.ALLOCATIONGRANULARITY
        # ACCESS_COPY (private, writable) lets torch alias the pages without a read-only
        # warning; nothing writes to them, so nothing is ever copied.
        mm = mmap.mmap(fd, offset + length - lo, offset=lo, access=mmap.ACCESS_COPY)
        return mm, offset - lo

    def trim_heap(self) -> None:
        """Hand freed heap pages back to the kernel where the allocator can (glibc only)."""

    # -- positional I/O ------------------------------------------------------------------------

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        """Read up to ``n`` bytes at ``offset`` without moving a shared file position."""
        return os.pread(fd, n, offset)

    def pread_into(self, fd: int, view: memoryview, offset: int) -> int:
        """Read into ``view`` at ``offset``; returns the bytes read (0 at end of file)."""
        return os.preadv(fd, [view], offset)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset``; returns the bytes written."""
        return os.pwrite(fd, data, offset)


@dataclass(frozen=True)
class _Linux(Platform):
    def data_sync(self, fd: int) -> None:
        os.fdatasync(fd)

    def release_pages(self, mm: mmap.mmap, offset: int, length: int) -> None:
        # MADV_DONTNEED on a private file mapping drops the pages at once; touching them
        # again faults them back in from the page cache.
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is not None and length > 0:
            mm.madvise(advice, offset, length)

    def trim_heap(self) -> None:
        # the replay path's chunk temporaries sit below glibc's mmap threshold; without a trim
        # the heap fragments and RSS creeps up by hundreds of MiB over a long run (measured)
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)


@dataclass(frozen=True)
class _MacOS(Platform):
    def full_sync(self, fd: int) -> None:
        op = getattr(fcntl, "F_FULLFSYNC", None) if fcntl is not None else None
        if op is not None:
            try:
                fcntl.fcntl(fd, op)
                return
            except OSError:
                pass  # SMB, FAT and some FUSE filesystems refuse it: fsync is all there is
        os.fsync(fd)


@dataclass(frozen=True)
class _Windows(Platform):
    replace_attempts: int = 10
    """Tries of a rename refused because a scanner or indexer has the file open briefly."""

    def sync_file(self, path: Path) -> None:
        # FlushFileBuffers needs a handle with write access
        fd = os.open(path, os.O_RDWR | BINARY)
        try:
            self.full_sync(fd)
        finally:
            os.close(fd)

    def sync_dir(self, path: Path) -> None:
        """Nothing to do: NTFS journals renames, and a directory cannot be opened as a file."""

    def replace(self, src: Path, dst: Path) -> None:
        delay = 0.01
        for attempt in range(self.replace_attempts):
            try:
                os.replace(src, dst)
                return
            except PermissionError:
                # sharing violation: another process (antivirus, indexer, a reader) has
                # src or dst open without FILE_SHARE_DELETE; it usually lets go in ms
                if attempt == self.replace_attempts - 1:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def lock(self, path: Path) -> HeldLock:
        """A lock file created exclusively, holding our pid; a dead holder's file is taken over.

        The pid is only meaningful on this host (a shared folder locked from another machine
        looks stale), and a reused pid keeps a stale lock held: the error names the file.
        """
        content = f"{os.getpid()} {uuid.uuid4().hex}\n".encode()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | BINARY, 0o644)
            except FileExistsError:
                holder = _lock_holder(path)
                if holder is None:
                    continue  # vanished, or stale and just removed: try again
                raise LockHeld(path, holder or None) from None
            try:
                os.write(fd, content)
            finally:
                os.close(fd)
            return _FileLock(path, content)
        raise LockHeld(path)

    def advise_sequential(self, mm: mmap.mmap) -> None:
        """No advice exists on Windows."""

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        with _SEEK_IO:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, n)

    def pread_into(self, fd: int, view: memoryview, offset: int) -> int:
        data = self.pread(fd, len(view), offset)
        view[: len(data)] = data
        return len(data)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        with _SEEK_IO:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.write(fd, data)


LINUX: Platform = _Linux("linux", windowed_maps=False)
MACOS: Platform = _MacOS("macos", windowed_maps=True)
WINDOWS: Platform = _Windows("windows", windowed_maps=True)
PLATFORMS: dict[str, Platform] = {p.name: p for p in (LINUX, MACOS, WINDOWS)}


def current() -> Platform:
    """The implementation for this process: ``$STREAMMERGE_PLATFORM`` if set, else the host's."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        try:
            return PLATFORMS[forced]
        except KeyError:
            raise StreamMergeError(
                f"{ENV} must be one of {', '.join(PLATFORMS)}, not {forced!r}"
            ) from None
    if sys.platform == "darwin":
        return MACOS
    if sys.platform == "win32":
        return WINDOWS
    return LINUX  # Linux and the other POSIX systems with the same calls


def trim_heap() -> None:
    """:meth:`Platform.trim_heap` of :func:`current` (a no-op where libc cannot trim)."""
    current().trim_heap()


_LIBC: list[ctypes.CDLL | None] = []


def _glibc() -> ctypes.CDLL | None:
    """glibc, loaded once, or None (musl, macOS, Windows: no ``malloc_trim``)."""
    if not _LIBC:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            libc = None
        _LIBC.append(libc)
    return _LIBC[0]


def _lock_holder(path: Path) -> int | None:
    """The pid holding lock file ``path`` (0: held, pid not written yet), or None if the lock
    is free now: the file vanished, or its holder is dead and the file was removed."""
    try:
        raw = path.read_bytes()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        pid: int | None = int(raw.split()[0])
    except (IndexError, ValueError):
        # being written right now, or left empty by a crash mid-creation
        if age < STALE_EMPTY_LOCK_S:
            return 0
        pid = None
    if pid is not None and (pid == os.getpid() or pid_alive(pid)):
        return pid
    try:
        if path.read_bytes() != raw:  # someone else took it over meanwhile
            return None
        path.unlink()
    except FileNotFoundError:
        return None
    except PermissionError:  # Windows: still open by its writer
        return 0
    return None


def rss() -> tuple[int, int]:
    """(RSS, anonymous RSS) of this process in bytes, as the host kernel reports them.

    Only Linux splits file-backed pages out (psutil's ``shared``); elsewhere the anonymous
    figure is the whole RSS, an upper bound.
    """
    mi = psutil.Process().memory_info()
    return mi.rss, mi.rss - getattr(mi, "shared", 0)


def peak_rss() -> int:
    """Peak RSS of this process so far in bytes (the kernel's high-water mark).

    Linux reads ``VmHWM``, the address space's own high-water mark: ``ru_maxrss`` would not
    do there, since a child started by vfork (as ``subprocess`` does) inherits its parent's
    maximum, so a small merge launched from a large process would report the parent's peak.
    ``ru_maxrss`` is bytes on macOS; Windows has no ``resource`` module and reports the peak
    working set instead. Dispatched on the host, whatever is forced: units are the kernel's,
    not a choice.
    """
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass  # no /proc: fall back to getrusage
    try:
        import resource
    except ImportError:  # Windows
        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (asked of the host OS, whatever is forced)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists
        try:
            code = ctypes.c_ulong()
            ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return not ok or code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
