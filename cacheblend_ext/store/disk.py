"""The chunk store's disk tier: one checksummed file per chunk, shared by processes.

Files live at ``<root>/<key[:2]>/<key>.cbkv`` in the format of
:mod:`cacheblend_ext.store.chunk_format`. Several processes (and threads) may use one
directory at once:

* **Atomic publication.** A chunk is written to a temporary file in the same folder and
  published with ``os.replace``: readers never see a partial file, and writers racing on
  one chunk leave exactly one valid file.
* **Temporary files of dead writers.** A temporary file is named
  ``.<key>.<host>.<pid>.<thread>.<random>.tmp``. When a store opens the directory and on
  every budget scan, a temporary file whose writer process is gone (same host: the pid no
  longer exists, is a zombie, or was reused by a process started after the file was last
  written) is removed at once; one from another host, or with an unknown name, after an
  hour without a write.
* **One budget for all processes.** With a byte budget, the bytes in the directory are
  accounted in ``<root>/.usage`` under an exclusive ``flock`` of that file. Under that
  lock a writer adds its file's full size to the count and creates its temporary file
  preallocated to that size (so a scan counts it in full), and only then writes the data
  without the lock. If the count would exceed the budget, the writer first rescans the
  directory (the authoritative count: chunk files and temporary files of live writers),
  evicts the least recently used files down to 95% of the budget, and writes only if its
  file then fits (a chunk larger than the budget is not written). Bytes only ever appear
  in the directory under the lock and within the count, so it never holds more than the
  budget, however many processes of one host write into it. Files removed by anyone are
  subtracted; a writer killed mid-write leaves the count too high until the next rescan
  removes its temporary file.

Recency is the file's modification time (touched on every hit), shared by every process
and kept across restarts.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import torch

from .chunk_format import FormatError, Header, byte_view, check_layer, decode_header, decode_tail, header_span

FILE_SUFFIX = ".cbkv"
TMP_SUFFIX = ".tmp"
USAGE_FILE = ".usage"
TMP_MAX_AGE_S = 3600.0  # temporary files of unknown writers (other hosts, old names)
EVICT_TO = 0.95  # an eviction pass frees room down to this fraction of the budget

HOST = re.sub(r"[^0-9A-Za-z_-]", "-", socket.gethostname())[:64] or "host"  # as temporary file names hold it
_TMP_RE = re.compile(r"^\.(?P<key>[0-9A-Za-z_-]+)\.(?P<host>[0-9A-Za-z_-]+)\.(?P<pid>\d+)\.(?P<tid>\d+)"
                     r"\.(?P<rand>[0-9a-f]+)\.tmp$")
_USAGE = struct.Struct("<Q")


# ---------------------------------------------------------------------------
# Is the writer of a temporary file still alive?
# ---------------------------------------------------------------------------


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


_BOOT = _boot_time()
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_state(pid: int) -> tuple[str, float | None] | None:
    """``(state, start time in epoch seconds)`` of ``pid`` from /proc, ``None`` if it is gone
    or /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return ("?", None)
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may contain spaces
    start = _BOOT + int(fields[19]) / _CLK_TCK if _BOOT is not None and len(fields) > 19 else None
    return fields[0], start


def writer_alive(pid: int, written_at: float) -> bool:
    """Whether process ``pid`` (on this host) can still be writing a file last written at
    ``written_at``: it exists, is not a zombie, and started before that write."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return True
    state = _proc_state(pid)
    if state is None:
        return os.path.exists(f"/proc/{pid}") or not os.path.isdir("/proc")
    status, started = state
    if status in ("Z", "X"):
        return False
    # a pid reused by a process started after the file was last written is not the writer
    return started is None or started <= written_at + 2.0


def tmp_is_stale(name: str, mtime: float, now: float) -> bool:
    """Whether a temporary file can be removed: its writer is gone (same host), or it is
    older than ``TMP_MAX_AGE_S`` (another host, or a name without a writer)."""
    m = _TMP_RE.match(name)
    if m is not None and m["host"] == HOST:
        return not writer_alive(int(m["pid"]), mtime)
    return now - mtime > TMP_MAX_AGE_S


def tmp_name(key: str) -> str:
    return f".{key}.{HOST}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"


# ---------------------------------------------------------------------------
# Reading one chunk file
# ---------------------------------------------------------------------------


def _readinto_exact(f, view: memoryview, offset: int) -> None:
    f.seek(offset)
    done, n = 0, len(view)
    while done < n:
        got = f.readinto(view[done:])
        if not got:
            raise FormatError(f"file ends {n - done} bytes early")
        done += got


class FileReader:
    """An open chunk file: verified layers on demand (one thread at a time)."""

    tier = "disk"

    def __init__(self, disk: "DiskTier", key: str, f, header: Header):
        self.disk, self.key, self.file, self.header = disk, key, f, header

    def read_layer(self, l: int, out: torch.Tensor) -> None:
        """Read layer ``l`` into the contiguous CPU tensor ``out`` and verify its crc."""
        view = byte_view(out)
        _readinto_exact(self.file, view, self.header.layer_offset(l))
        check_layer(self.header, l, view)

    def read_tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = bytearray(self.header.tail_nbytes)
        _readinto_exact(self.file, memoryview(data), self.header.tail_offset)
        return decode_tail(self.header, data)

    def discard(self) -> None:
        """The file is corrupt: remove it (if it is still this file)."""
        self.disk.remove_if_same(self.key, self.file)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ---------------------------------------------------------------------------
# The tier
# ---------------------------------------------------------------------------


class DiskTier:
    """A directory of chunk files (see the module docstring)."""

    def __init__(self, root, budget: int | None, model_id: str, rope_id: str, fsync: bool = False):
        if budget is not None and budget < 0:
            raise ValueError(f"disk_bytes must be non-negative or None, got {budget}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self.model_id, self.rope_id = model_id, rope_id
        self.fsync = fsync
        self.evicted = 0
        if budget is None:
            self.scan(clean=True)  # removes the temporary files of dead writers
        else:
            with self._usage() as usage:  # the scan under the lock: no write slips between it and the count
                usage.write(self.scan(clean=True)[0])

    # -- paths and scans -------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{FILE_SUFFIX}"

    def _dir_entries(self):
        try:
            subdirs = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for d in subdirs:
            if not d.is_dir(follow_symlinks=False):
                continue
            try:
                yield from os.scandir(d.path)
            except FileNotFoundError:
                continue

    def scan(self, clean: bool = False) -> tuple[int, list[tuple[float, int, str]]]:
        """``(bytes in use, chunk files)``: chunk files and temporary files count; with
        ``clean`` the temporary files of dead writers are removed first (and not counted).
        Chunk files are ``(mtime, size, path)``, least recently used first."""
        now = time.time()
        used, files = 0, []
        for e in self._dir_entries():
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.name.endswith(TMP_SUFFIX):
                if clean and tmp_is_stale(e.name, st.st_mtime, now):
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
                    continue
                used += st.st_size
            elif e.name.endswith(FILE_SUFFIX):
                used += st.st_size
                files.append((st.st_mtime, st.st_size, e.path))
        files.sort()
        return used, files

    def entries(self) -> list[tuple[float, int, str]]:
        """``(mtime, size, path)`` of every chunk file, oldest first."""
        return self.scan()[1]

    def total_bytes(self) -> int:
        """Bytes in the directory: chunk files and temporary files of live writers."""
        return self.scan()[0]

    def keys(self) -> list[str]:
        return [os.path.basename(p)[: -len(FILE_SUFFIX)] for _, _, p in self.entries()]

    # -- shared budget -----------------------------------------------------------
    @contextlib.contextmanager
    def _usage(self):
        """The shared byte count, under an exclusive lock held for the ``with`` block."""
        import fcntl

        fd = os.open(self.root / USAGE_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield _Usage(fd)
        finally:
            os.close(fd)  # releases the lock

    def _create_reserved(self, tmp: Path, nbytes: int, protect: str) -> int | None:
        """Create ``tmp`` preallocated to ``nbytes`` and account for it, evicting least
        recently used files first if needed; both happen under the shared lock, so a
        rescan by another process always sees the file. Returns the open descriptor, or
        ``None`` when the bytes cannot fit (more than everything evictable)."""
        if self.budget is None:
            return _create_preallocated(tmp, nbytes)
        if nbytes > self.budget:
            return None
        with self._usage() as usage:
            used = usage.read()
            if used is None or used + nbytes > self.budget:
                used = self._evict(nbytes, protect)
            if used + nbytes > self.budget:
                usage.write(used)
                return None
            fd = _create_preallocated(tmp, nbytes)
            usage.write(used + nbytes)
        return fd

    def _evict(self, nbytes: int, protect: str) -> int:
        """Rescan and remove LRU files until ``nbytes`` more fit under ``EVICT_TO`` of the
        budget (lock held); returns the bytes left in use."""
        used, files = self.scan(clean=True)
        target = max(0, min(self.budget - nbytes, int(self.budget * EVICT_TO) - nbytes))
        for _, size, p in files:
            if used <= target:
                break
            if os.path.basename(p)[: -len(FILE_SUFFIX)] == protect:
                continue
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            used -= size
            self.evicted += 1
        return used

    def _release(self, nbytes: int) -> None:
        if self.budget is None or nbytes <= 0:
            return
        with self._usage() as usage:
            used = usage.read()
            if used is not None:
                usage.write(max(0, used - nbytes))

    def enforce_budget(self) -> int:
        """Rescan and evict until the directory fits the budget; returns the files removed."""
        if self.budget is None:
            return 0
        before = self.evicted
        with self._usage() as usage:
            usage.write(self._evict(0, ""))
        return self.evicted - before

    # -- writing -------------------------------------------------------------------
    def has_valid(self, key: str) -> bool:
        """A readable file with a valid header for ``key`` exists (and is touched)."""
        try:
            with open(self.path(key), "rb", buffering=0) as f:
                self._read_header(f, key)
        except (FormatError, OSError):
            return False
        self.touch(key)
        return True

    def write(self, key: str, encoded) -> str:
        """Publish ``encoded`` (:class:`chunk_format.Encoded`) as ``key``'s file.

        Returns ``"exists"`` (a valid file was there), ``"written"`` or ``"no_room"``
        (larger than what the budget can free)."""
        path = self.path(key)
        if path.exists() and self.has_valid(key):
            return "exists"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / tmp_name(key)
        fd = self._create_reserved(tmp, encoded.size, protect=key)
        if fd is None:
            return "no_room"
        try:
            with open(fd, "wb", buffering=0) as f:
                for part in encoded.parts:
                    write_all(f, part)
                if self.fsync:
                    os.fsync(f.fileno())
            replaced = _size_or_zero(path)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._release(encoded.size)
            raise
        self._release(replaced)
        return "written"

    # -- removal ---------------------------------------------------------------------
    def remove(self, key: str) -> None:
        p = self.path(key)
        size = _size_or_zero(p)
        try:
            os.unlink(p)
        except OSError:
            return
        self._release(size)

    def remove_if_same(self, key: str, f) -> None:
        """Unlink ``key``'s file if it is still the file ``f`` (not a newer replacement)."""
        p = self.path(key)
        try:
            st = os.stat(p)
            if f is None or st.st_ino == os.fstat(f.fileno()).st_ino:
                os.unlink(p)
                self._release(st.st_size)
        except OSError:
            pass

    def clear(self) -> None:
        for _, _, p in self.entries():
            with contextlib.suppress(OSError):
                os.unlink(p)
        if self.budget is not None:
            with self._usage() as usage:
                usage.write(self.scan()[0])

    # -- reading -----------------------------------------------------------------------
    def touch(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.path(key))

    def _read_header(self, f, key: str) -> Header:
        first = f.read(4096)
        span = header_span(first)
        if span > len(first):
            first += f.read(span - len(first))
        return decode_header(first, key, self.model_id, self.rope_id, os.fstat(f.fileno()).st_size)

    def open(self, key: str) -> tuple[FileReader | None, bool]:
        """``(reader, corrupt)``: a reader over ``key``'s verified header, or ``None`` (missing,
        or corrupt: then the file was removed and ``corrupt`` is True)."""
        try:
            f = open(self.path(key), "rb", buffering=0)
        except OSError:
            return None, False
        try:
            return FileReader(self, key, f, self._read_header(f, key)), False
        except (FormatError, OSError):
            self.remove_if_same(key, f)
            f.close()
            return None, True


class _Usage:
    def __init__(self, fd: int):
        self.fd = fd

    def read(self) -> int | None:
        raw = os.pread(self.fd, _USAGE.size, 0)
        return _USAGE.unpack(raw)[0] if len(raw) == _USAGE.size else None

    def write(self, value: int) -> None:
        os.pwrite(self.fd, _USAGE.pack(max(0, int(value))), 0)


def write_all(f, data) -> None:
    """Write every byte of ``data`` (raw files may write less than asked)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = f.write(view)
        view = view[n:]


def _create_preallocated(tmp: Path, size: int) -> int:
    """Create ``tmp`` with its final ``size`` allocated (so every scan counts it in full;
    a full disk fails here, before any data is written)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if size > 0:
            try:
                os.posix_fallocate(fd, 0, size)
            except (AttributeError, OSError) as exc:
                if getattr(exc, "errno", None) == 28:  # ENOSPC
                    raise
                os.ftruncate(fd, size)  # file systems without fallocate: the size still shows
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def _size_or_zero(p) -> int:
    try:
        return os.stat(p).st_size
    except OSError:
        return 0


__all__ = ["DiskTier", "FILE_SUFFIX", "FileReader", "TMP_MAX_AGE_S", "tmp_is_stale", "writer_alive"]
