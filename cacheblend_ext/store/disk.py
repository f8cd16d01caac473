"""The chunk store's disk tier: one checksummed file per chunk, shared by processes.

Files live at ``<root>/<scope>/<key[:2]>/<key>.cbkv`` in the format of
:mod:`cacheblend_ext.store.chunk_format` (the header repeats the scope and the key, and is
checked on every read, so a file copied into another scope's folder is refused). Several
processes (and threads) may use one directory at once, and every scope shares its byte
budget:

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
and kept across restarts. Files of format version 1 (``<root>/<key[:2]>/<key>.cbkv``, no
scope) are never read; they count against the budget until the first scan of a store
that opens the directory removes them.
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

    def __init__(self, disk: "DiskTier", scope: str, key: str, f, header: Header):
        self.disk, self.scope, self.key, self.file, self.header = disk, scope, key, f, header

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
        """The file is corrupt or forged: remove it (if it is still this file)."""
        self.disk.remove_if_same(self.scope, self.key, self.file)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ---------------------------------------------------------------------------
# The tier
# ---------------------------------------------------------------------------


class DiskTier:
    """A directory of chunk files (see the module docstring)."""

    def __init__(self, root, budget: int | None, model_id: str, rope_id: str, fsync: bool = False, mac=None):
        if budget is not None and budget < 0:
            raise ValueError(f"disk_bytes must be non-negative or None, got {budget}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self.model_id, self.rope_id = model_id, rope_id
        self.mac = mac  # ChunkMac or None
        self.fsync = fsync
        self.evicted = 0
        if budget is None:
            self.scan(clean=True)  # removes the temporary files of dead writers
        else:
            with self._usage() as usage:  # the scan under the lock: no write slips between it and the count
                usage.write(self.scan(clean=True)[0])

    # -- paths and scans -------------------------------------------------------
    def path(self, scope: str, key: str) -> Path:
        return self.root / scope / key[:2] / f"{key}{FILE_SUFFIX}"

    def _dir_entries(self, scope: str | None = None):
        """``(entry, current)`` of every file in the key-prefix folders of every scope folder
        (or of ``scope``'s) with ``current=True``, and of the files directly in a scope
        folder with ``current=False`` (format version 1 kept its files there)."""
        if scope is not None:
            tops = [self.root / scope]
        else:
            try:
                tops = [d.path for d in os.scandir(self.root) if d.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                return
        for top in tops:
            try:
                subs = list(os.scandir(top))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for d in subs:
                if not d.is_dir(follow_symlinks=False):
                    yield d, False
                    continue
                try:
                    for e in os.scandir(d.path):
                        yield e, True
                except FileNotFoundError:
                    continue

    def scan(self, clean: bool = False, scope: str | None = None) -> tuple[int, list[tuple[float, int, str]]]:
        """``(bytes in use, chunk files)``: chunk files and temporary files count; with
        ``clean`` the temporary files of dead writers and the files of format version 1 are
        removed first (and not counted). Chunk files are ``(mtime, size, path)``, least
        recently used first (old-format files among them). ``scope``: only its folder."""
        now = time.time()
        used, files = 0, []
        for e, current in self._dir_entries(scope):
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
                if clean and not current:
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
                    continue
                used += st.st_size
                files.append((st.st_mtime, st.st_size, e.path))
        files.sort()
        return used, files

    def entries(self, scope: str | None = None) -> list[tuple[float, int, str]]:
        """``(mtime, size, path)`` of every chunk file (of ``scope``, when given), oldest first."""
        return self.scan(scope=scope)[1]

    def total_bytes(self) -> int:
        """Bytes in the directory: chunk files and temporary files of live writers."""
        return self.scan()[0]

    def keys(self, scope: str) -> list[str]:
        """Keys of ``scope``'s files, least recently used first."""
        return [os.path.basename(p)[: -len(FILE_SUFFIX)] for _, _, p in self.entries(scope)]

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
        """Rescan and remove LRU files (except the file at path ``protect``) until ``nbytes``
        more fit under ``EVICT_TO`` of the budget (lock held); returns the bytes left in use."""
        used, files = self.scan(clean=True)
        target = max(0, min(self.budget - nbytes, int(self.budget * EVICT_TO) - nbytes))
        for _, size, p in files:
            if used <= target:
                break
            if p == protect:
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
    def has_valid(self, scope: str, key: str) -> bool:
        """A readable file with a valid header (and header MAC) for ``key`` of ``scope``
        exists (and is touched)."""
        try:
            with open(self.path(scope, key), "rb", buffering=0) as f:
                self._read_header(f, scope, key)
        except (FormatError, OSError):
            return False
        self.touch(scope, key)
        return True

    def write(self, scope: str, key: str, encoded) -> str:
        """Publish ``encoded`` (:class:`chunk_format.Encoded`) as the file of ``key`` in ``scope``.

        Returns ``"exists"`` (a valid file was there), ``"written"`` or ``"no_room"``
        (larger than what the budget can free)."""
        path = self.path(scope, key)
        if path.exists() and self.has_valid(scope, key):
            return "exists"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / tmp_name(key)
        fd = self._create_reserved(tmp, encoded.size, protect=str(path))
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
    def remove(self, scope: str, key: str) -> None:
        p = self.path(scope, key)
        size = _size_or_zero(p)
        try:
            os.unlink(p)
        except OSError:
            return
        self._release(size)

    def remove_if_same(self, scope: str, key: str, f) -> None:
        """Unlink the file of ``key`` in ``scope`` if it is still the file ``f`` (not a newer
        replacement)."""
        p = self.path(scope, key)
        try:
            st = os.stat(p)
            if f is None or st.st_ino == os.fstat(f.fileno()).st_ino:
                os.unlink(p)
                self._release(st.st_size)
        except OSError:
            pass

    def clear(self, scope: str | None = None) -> None:
        """Remove every chunk file (of ``scope`` only, when given)."""
        for _, _, p in self.entries(scope):
            with contextlib.suppress(OSError):
                os.unlink(p)
        if self.budget is not None:
            with self._usage() as usage:
                usage.write(self.scan()[0])

    # -- reading -----------------------------------------------------------------------
    def touch(self, scope: str, key: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.path(scope, key))

    def _read_header(self, f, scope: str, key: str) -> Header:
        first = f.read(8192)
        span = header_span(first)
        if span > len(first):
            first += f.read(span - len(first))
        return decode_header(first, key, scope, self.model_id, self.rope_id, os.fstat(f.fileno()).st_size,
                             mac=self.mac)

    def open(self, scope: str, key: str) -> tuple[FileReader | None, Exception | None]:
        """``(reader, refused)``: a reader over the verified header of ``key``'s file in
        ``scope``, or ``(None, None)`` when there is none, or ``(None, error)`` when the file
        was refused (corrupt, or a bad MAC: a :class:`~.chunk_format.MacError`) and removed."""
        try:
            f = open(self.path(scope, key), "rb", buffering=0)
        except OSError:
            return None, None
        try:
            return FileReader(self, scope, key, f, self._read_header(f, scope, key)), None
        except (FormatError, OSError) as exc:
            self.remove_if_same(scope, key, f)
            f.close()
            return None, exc


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
