"""Content-addressed chunk KV store: GPU memory -> CPU memory -> disk.

A stored chunk is the KV a model produced for one passage: ``kv`` ``[L, 2, T, H, D]``
(all layers, K after RoPE, then V), the absolute ``positions`` ``[T]`` it was computed
at, its ``token_ids`` and a little JSON ``meta``. Chunks are addressed by a *key* that
hashes everything the KV depends on (:func:`chunk_key`: model identity, RoPE identity,
dtype, token ids and any extra policy string), so any subset of chunks in any order can
be reused; nothing assumes a shared prefix.

Tiers
-----
* **gpu**: tensors on the store's CUDA device (budget ``gpu_bytes``, 0 disables it);
* **cpu**: host tensors, page-locked (pinned) when CUDA is available so host-to-device
  copies run asynchronously (budget ``cpu_bytes``);
* **disk**: one file per chunk under ``disk_dir`` (budget ``disk_bytes``; ``None`` means
  unbounded). The disk tier is write-through: :meth:`ChunkStore.put` always writes the
  file when a directory is configured, so dropping a chunk from memory never loses it,
  and the files survive a process restart.

Each tier keeps its own least-recently-used order under its byte budget. A hit in a
lower tier promotes the chunk into the memory tiers above it (when they have a budget);
a chunk evicted from the GPU tier moves down to the CPU tier. Disk recency is the file's
modification time (touched on every hit), so the order is shared by every process using
the directory and survives restarts.

File format (version 1)
-----------------------
``MAGIC`` (8 bytes) | version u32 | header length u32 | header crc32 u32 | header (JSON,
UTF-8) | zero padding to a 64-byte boundary | ``L`` layer blocks (each ``kv[l]``, i.e.
``[2, T, H, D]`` in the stored dtype) | positions int64 ``[T]`` | token ids int64.
The header records the key, model and RoPE identity, dtype, shape, the crc32 of every
layer block and of the positions/token-id block, and the expected payload size. Layers
are checksummed separately so a layer-wise loader can verify each layer as it arrives.

Failure handling
----------------
Writes go to a temporary file in the same directory and are published with
``os.replace`` (atomic on POSIX), so readers never see a partial file and several
threads or processes writing the same chunk leave exactly one valid file. A file whose
magic, version, header checksum, identity, size or payload checksum is wrong is treated
as a miss: it is removed (only if it is still the same file: a concurrent writer may have
replaced it with a good one) and counted in ``stats()["corrupt"]``; no exception reaches
the caller of :meth:`ChunkStore.get`. The layer-wise loader reports a payload that fails
its checksum mid-request as :class:`ChunkCorruptError` (the file is removed first), so the
request can be retried with that chunk treated as uncached.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

MAGIC = b"CBKVSTR\x00"
FORMAT_VERSION = 1
FILE_SUFFIX = ".cbkv"
_PREFIX = struct.Struct("<8sIII")  # magic, version, header length, header crc32
_ALIGN = 64
_TMP_MAX_AGE_S = 3600.0
_KEY_RE = re.compile(r"^[0-9A-Za-z_-]{1,128}$")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
    "float8_e5m2": getattr(torch, "float8_e5m2", None),
}
_DTYPES = {k: v for k, v in _DTYPES.items() if v is not None}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

TIERS = ("gpu", "cpu", "disk")


class ChunkCorruptError(RuntimeError):
    """A stored chunk failed a checksum while it was being loaded layer by layer.

    The file has already been removed; the chunk should be treated as uncached.
    """

    def __init__(self, key: str, reason: str):
        super().__init__(f"stored chunk {key} is corrupt ({reason}); it was removed from the store")
        self.key = key
        self.reason = reason


class _Corrupt(Exception):
    pass


# ---------------------------------------------------------------------------
# Identity and keys
# ---------------------------------------------------------------------------


def _hash_hex(parts: Iterable[bytes], digest_size: int = 20) -> str:
    h = hashlib.blake2b(digest_size=digest_size)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored (supported: {', '.join(_DTYPES)})") from None


def model_identity(model_or_config, name: str | None = None) -> str:
    """A stable identity string for a Hugging Face model (or its config).

    Hashes the config's JSON (architecture, sizes, RoPE parameters, ...) and the model's
    name or path. Two models with the same config and name share KV only if their weights
    are the same, so pass a distinguishing ``name`` (e.g. a weights checksum) for
    fine-tuned variants stored under one name.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "to_json_string"):
        text = config.to_json_string(use_diff=False)
        try:
            d = json.loads(text)
            for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
                d.pop(k, None)
            text = json.dumps(d, sort_keys=True)
        except ValueError:
            pass
    else:
        text = json.dumps(config, sort_keys=True, default=str)
    if name is None:
        name = getattr(config, "_name_or_path", "") or ""
    return "m-" + _hash_hex([name.encode(), text.encode()], 12)


def rope_identity(rope_spec) -> str:
    """Identity of a RoPE table (:class:`cacheblend_ext.rope.RopeSpec` or a raw table)."""
    table = getattr(rope_spec, "cos_sin_cache", rope_spec)
    is_neox = getattr(rope_spec, "is_neox", True)
    t = table.detach().to("cpu", torch.float32).contiguous()
    # The first rows fix every frequency; hashing a bounded prefix keeps this cheap.
    head = t[: min(t.shape[0], 4096)]
    return "r-" + _hash_hex([head.numpy().tobytes(), str(tuple(t.shape)).encode(), str(bool(is_neox)).encode()], 12)


def chunk_key(model_id: str, rope_id: str, dtype: torch.dtype, token_ids, extra: str = "") -> str:
    """Content address of a chunk's KV: hex blake2b of everything the KV depends on.

    ``extra`` carries any further policy that changes the KV (e.g. the shared prefix the
    chunk was encoded after, or the positions it was encoded at).
    """
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    else:
        ids = torch.as_tensor(list(token_ids), dtype=torch.int64).numpy().tobytes()
    return _hash_hex([model_id.encode(), rope_id.encode(), dtype_name(dtype).encode(), ids, extra.encode()], 20)


def _safe_key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"chunk key must be a str, got {type(key).__name__}")
    if _KEY_RE.match(key):
        return key
    return "h" + _hash_hex([key.encode()], 20)


# ---------------------------------------------------------------------------
# Stored chunks and memory tiers
# ---------------------------------------------------------------------------


@dataclass
class StoredChunk:
    """A chunk's KV as held by the store.

    ``kv`` ``[L, 2, T, H, D]`` (K after RoPE, then V), ``positions`` int64 ``[T]`` on the
    CPU, ``token_ids`` int64 ``[T']`` on the CPU (may be empty), ``meta`` a JSON-able dict.
    Tensors returned by :meth:`ChunkStore.get` are the store's own copies: read them, do
    not modify them in place.
    """

    key: str
    kv: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def num_layers(self) -> int:
        return int(self.kv.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[2])


class _MemTier:
    """LRU map key -> StoredChunk under a byte budget (callers hold the store lock)."""

    def __init__(self, name: str, budget: int):
        self.name = name
        self.budget = int(budget)
        self.items: OrderedDict[str, StoredChunk] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> StoredChunk | None:
        item = self.items.get(key)
        if item is not None:
            self.items.move_to_end(key)
        return item

    def fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.budget

    def insert(self, item: StoredChunk) -> list[StoredChunk]:
        """Insert (or refresh) ``item``; returns the evicted items, oldest first."""
        old = self.items.pop(item.key, None)
        if old is not None:
            self.bytes -= old.nbytes
        self.items[item.key] = item
        self.bytes += item.nbytes
        evicted = []
        while self.bytes > self.budget and self.items:
            _, victim = self.items.popitem(last=False)
            self.bytes -= victim.nbytes
            evicted.append(victim)
        return evicted

    def remove(self, key: str) -> StoredChunk | None:
        item = self.items.pop(key, None)
        if item is not None:
            self.bytes -= item.nbytes
        return item


# ---------------------------------------------------------------------------
# Disk tier
# ---------------------------------------------------------------------------


@dataclass
class _Header:
    key: str
    model_id: str
    rope_id: str
    dtype: torch.dtype
    shape: tuple  # (L, 2, T, H, D)
    data_offset: int
    layer_nbytes: int
    layer_crc: list
    num_positions: int
    num_token_ids: int
    tail_crc: int
    meta: dict

    @property
    def tail_offset(self) -> int:
        return self.data_offset + self.shape[0] * self.layer_nbytes

    @property
    def file_size(self) -> int:
        return self.tail_offset + 8 * (self.num_positions + self.num_token_ids)


def _readinto_exact(f, view: memoryview, offset: int) -> None:
    f.seek(offset)
    done = 0
    n = len(view)
    while done < n:
        got = f.readinto(view[done:])
        if not got:
            raise _Corrupt(f"file ends {n - done} bytes early")
        done += got


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable/readable byte view of a contiguous CPU tensor (any dtype)."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


class _DiskTier:
    def __init__(self, root: Path, budget: int | None, model_id: str, rope_id: str, fsync: bool):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self.model_id = model_id
        self.rope_id = rope_id
        self.fsync = fsync
        self._est_bytes = None  # estimate of the directory's size; rescanned when over budget
        self._clean_stale_tmp()

    # -- paths ---------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{FILE_SUFFIX}"

    def _files(self):
        try:
            subdirs = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for d in subdirs:
            if not d.is_dir(follow_symlinks=False):
                continue
            try:
                for e in os.scandir(d.path):
                    yield e
            except FileNotFoundError:
                continue

    def _clean_stale_tmp(self) -> None:
        now = time.time()
        for e in self._files():
            if e.name.endswith(".tmp"):
                try:
                    if now - e.stat().st_mtime > _TMP_MAX_AGE_S:
                        os.unlink(e.path)
                except OSError:
                    pass

    def entries(self) -> list[tuple[float, int, str]]:
        """``(mtime, size, path)`` of every chunk file, oldest first."""
        out = []
        for e in self._files():
            if e.name.endswith(FILE_SUFFIX):
                try:
                    st = e.stat()
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, e.path))
        out.sort()
        return out

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def keys(self) -> list[str]:
        return [os.path.basename(p)[: -len(FILE_SUFFIX)] for _, _, p in self.entries()]

    # -- writing ---------------------------------------------------------------
    def write(self, chunk: StoredChunk) -> int:
        """Write ``chunk`` atomically; returns the file size (0 if a valid file was already there)."""
        path = self.path(chunk.key)
        if path.exists():
            try:
                with open(path, "rb", buffering=0) as f:
                    self._read_header(f, chunk.key)
                self.touch(chunk.key)
                return 0
            except (_Corrupt, OSError):
                pass  # rewrite it below
        path.parent.mkdir(parents=True, exist_ok=True)
        kv = chunk.kv.detach()
        if kv.device.type != "cpu":
            kv = kv.to("cpu")
        kv = kv.contiguous()
        L = kv.shape[0]
        layer_nbytes = kv[0].numel() * kv.element_size() if L else 0
        tail = torch.cat([chunk.positions.to("cpu", torch.int64).reshape(-1),
                          chunk.token_ids.to("cpu", torch.int64).reshape(-1)]).contiguous()
        layer_crc = [zlib.crc32(_byte_view(kv[l])) for l in range(L)]
        header = {
            "key": chunk.key,
            "model_id": self.model_id,
            "rope_id": self.rope_id,
            "dtype": dtype_name(kv.dtype),
            "shape": list(kv.shape),
            "layer_nbytes": layer_nbytes,
            "layer_crc": layer_crc,
            "num_positions": int(chunk.positions.numel()),
            "num_token_ids": int(chunk.token_ids.numel()),
            "tail_crc": zlib.crc32(_byte_view(tail)),
            "meta": chunk.meta or {},
        }
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        prefix_len = _PREFIX.size + len(hbytes)
        data_offset = (prefix_len + _ALIGN - 1) // _ALIGN * _ALIGN
        tmp = path.parent / f".{chunk.key}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb", buffering=0) as f:
                f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes), zlib.crc32(hbytes)))
                f.write(hbytes)
                f.write(b"\x00" * (data_offset - prefix_len))
                for l in range(L):
                    f.write(_byte_view(kv[l]))
                f.write(_byte_view(tail))
                if self.fsync:
                    os.fsync(f.fileno())
            size = os.stat(tmp).st_size
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if self._est_bytes is not None:
            self._est_bytes += size
        return size

    def enforce_budget(self, protect: str | None = None) -> list[str]:
        """Remove least recently used files until the directory fits the budget."""
        if self.budget is None:
            return []
        if self._est_bytes is not None and self._est_bytes <= self.budget:
            return []
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, p in entries:
            if total <= self.budget:
                break
            key = os.path.basename(p)[: -len(FILE_SUFFIX)]
            if key == protect:
                continue
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            total -= size
            removed.append(key)
        self._est_bytes = total
        return removed

    # -- reading -------------------------------------------------------------
    def touch(self, key: str) -> None:
        try:
            os.utime(self.path(key))
        except OSError:
            pass

    def _read_header(self, f, key: str) -> _Header:
        raw = f.read(_PREFIX.size)
        if len(raw) < _PREFIX.size:
            raise _Corrupt("file shorter than its header")
        magic, version, hlen, hcrc = _PREFIX.unpack(raw)
        if magic != MAGIC:
            raise _Corrupt("bad magic")
        if version != FORMAT_VERSION:
            raise _Corrupt(f"format version {version}, expected {FORMAT_VERSION}")
        if hlen > (64 << 20):
            raise _Corrupt("implausible header length")
        hbytes = f.read(hlen)
        if len(hbytes) != hlen or zlib.crc32(hbytes) != hcrc:
            raise _Corrupt("header checksum mismatch")
        try:
            h = json.loads(hbytes)
            dtype = _DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            header = _Header(
                key=str(h["key"]), model_id=str(h["model_id"]), rope_id=str(h["rope_id"]), dtype=dtype,
                shape=shape, data_offset=(_PREFIX.size + hlen + _ALIGN - 1) // _ALIGN * _ALIGN,
                layer_nbytes=int(h["layer_nbytes"]), layer_crc=[int(c) for c in h["layer_crc"]],
                num_positions=int(h["num_positions"]), num_token_ids=int(h["num_token_ids"]),
                tail_crc=int(h["tail_crc"]), meta=dict(h.get("meta") or {}),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise _Corrupt(f"unreadable header ({exc})") from None
        if header.key != key:
            raise _Corrupt(f"file holds chunk {header.key!r}")
        if header.model_id != self.model_id or header.rope_id != self.rope_id:
            raise _Corrupt(f"written for model {header.model_id}/{header.rope_id}, "
                           f"this store is {self.model_id}/{self.rope_id}")
        L = shape[0] if shape else 0
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (len(shape) != 5 or shape[1] != 2 or len(header.layer_crc) != L
                or header.layer_nbytes != itemsize * shape[1] * shape[2] * shape[3] * shape[4]
                or header.num_positions != shape[2]):
            raise _Corrupt("inconsistent shapes in header")
        size = os.fstat(f.fileno()).st_size
        if size != header.file_size:
            raise _Corrupt(f"file is {size} bytes, header says {header.file_size} (truncated or padded)")
        return header

    def remove_if_same(self, key: str, f) -> None:
        """Unlink ``key``'s file if it is still the file ``f`` (not a newer replacement)."""
        p = self.path(key)
        try:
            if f is None or os.stat(p).st_ino == os.fstat(f.fileno()).st_ino:
                os.unlink(p)
        except OSError:
            pass

    def open(self, key: str):
        """``(file, header)`` for ``key``, or ``None`` (missing, or corrupt and then removed)."""
        try:
            f = open(self.path(key), "rb", buffering=0)
        except OSError:
            return None, None, False
        try:
            return f, self._read_header(f, key), False
        except (_Corrupt, OSError):
            self.remove_if_same(key, f)
            f.close()
            return None, None, True

    def read_tail(self, f, h: _Header) -> tuple[torch.Tensor, torch.Tensor]:
        tail = torch.empty(h.num_positions + h.num_token_ids, dtype=torch.int64)
        view = _byte_view(tail)
        _readinto_exact(f, view, h.tail_offset)
        if zlib.crc32(view) != h.tail_crc:
            raise _Corrupt("positions/token ids checksum mismatch")
        return tail[: h.num_positions].clone(), tail[h.num_positions:].clone()

    @staticmethod
    def read_layer(f, h: _Header, l: int, out: torch.Tensor) -> None:
        """Read layer ``l`` into the contiguous CPU tensor ``out`` ``[2, T, H, D]`` and verify it."""
        view = _byte_view(out)
        _readinto_exact(f, view, h.data_offset + l * h.layer_nbytes)
        if zlib.crc32(view) != h.layer_crc[l]:
            raise _Corrupt(f"layer {l} checksum mismatch")


# ---------------------------------------------------------------------------
# Layer-wise access
# ---------------------------------------------------------------------------


class ChunkHandle:
    """One chunk opened for layer-by-layer loading (see :mod:`cacheblend_ext.pipeline`).

    ``tier`` is where it was found. Memory tiers expose ``kv`` directly; a disk handle
    reads layer ``l`` into ``host_kv[l]`` (pinned when CUDA is available) with
    :meth:`load_layer`, verifying its checksum, and :meth:`finish` promotes the fully
    loaded chunk into the CPU tier. Always :meth:`close` a handle (or use ``with``).
    """

    def __init__(self, store: "ChunkStore", key: str, tier: str, *, chunk: StoredChunk | None = None,
                 file=None, header: _Header | None = None, positions=None, token_ids=None):
        self.store = store
        self.key = key
        self.tier = tier
        self._chunk = chunk
        self._file = file
        self._header = header
        self._loaded = 0
        self._failed = False
        if chunk is not None:
            self.kv = chunk.kv
            self.shape = tuple(chunk.kv.shape)
            self.dtype = chunk.kv.dtype
            self.positions = chunk.positions
            self.token_ids = chunk.token_ids
            self.meta = chunk.meta
            self.host_kv = chunk.kv if chunk.kv.device.type == "cpu" else None
        else:
            self.kv = None
            self.shape = header.shape
            self.dtype = header.dtype
            self.positions = positions
            self.token_ids = token_ids
            self.meta = header.meta
            self.host_kv = torch.empty(self.shape, dtype=self.dtype, pin_memory=store.pin_memory)

    @property
    def num_layers(self) -> int:
        return int(self.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.shape[2])

    @property
    def layer_nbytes(self) -> int:
        s = self.shape
        return s[1] * s[2] * s[3] * s[4] * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.layer_nbytes

    def load_layer(self, l: int) -> torch.Tensor:
        """Layer ``l`` ``[2, T, H, D]`` of a disk handle, read and verified (thread-safe per handle
        as long as one thread loads it). Raises :class:`ChunkCorruptError` on a bad checksum."""
        if self._file is None:
            return self.kv[l]
        out = self.host_kv[l]
        try:
            _DiskTier.read_layer(self._file, self._header, l, out)
        except (_Corrupt, OSError) as exc:
            self._failed = True
            self.store._report_corrupt(self.key, self._file)
            raise ChunkCorruptError(self.key, str(exc)) from None
        self._loaded += 1
        return out

    def finish(self) -> None:
        """After every layer was loaded: promote the chunk into the CPU tier."""
        if self._file is not None and not self._failed and self._loaded >= self.num_layers:
            self.store._promote_loaded(StoredChunk(self.key, self.host_kv, self.positions, self.token_ids, self.meta))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------


class ChunkStore:
    """Tiered, content-addressed store of chunk KV (see the module docstring).

    Args:
        model_id, rope_id: identity of the model and RoPE table the KV belongs to
            (:func:`model_identity`, :func:`rope_identity`); recorded in every file and
            checked on every read.
        disk_dir: directory of the disk tier (``None``: no disk tier).
        gpu_bytes, cpu_bytes, disk_bytes: byte budgets per tier (``disk_bytes=None``:
            unbounded).
        device: CUDA device of the GPU tier (default: the current one when CUDA is
            available and ``gpu_bytes > 0``).
        pin_memory: page-lock CPU-tier tensors (default: when CUDA is available).
        fsync: ``fsync`` each file before publishing it (durable across power loss).
    """

    def __init__(self, model_id: str = "", rope_id: str = "", *, disk_dir: str | os.PathLike | None = None,
                 gpu_bytes: int = 0, cpu_bytes: int = 1 << 30, disk_bytes: int | None = None,
                 device=None, pin_memory: bool | None = None, fsync: bool = False):
        self.model_id = str(model_id)
        self.rope_id = str(rope_id)
        cuda = torch.cuda.is_available()
        if device is not None:
            self.device = torch.device(device)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        else:  # only a GPU tier needs a device (and a CUDA context)
            self.device = torch.device("cuda", torch.cuda.current_device()) if cuda and gpu_bytes > 0 else None
        if self.device is not None and self.device.type != "cuda":
            self.device = None
        self.pin_memory = bool(cuda if pin_memory is None else pin_memory and cuda)
        self._gpu = _MemTier("gpu", gpu_bytes if self.device is not None else 0)
        self._cpu = _MemTier("cpu", cpu_bytes)
        self._disk = _DiskTier(Path(disk_dir), disk_bytes, self.model_id, self.rope_id, fsync) if disk_dir is not None else None
        self._lock = threading.RLock()
        self._stats = {"hits": {t: 0 for t in TIERS}, "misses": 0, "corrupt": 0, "puts": 0, "write_errors": 0,
                       "evictions": {t: 0 for t in TIERS}, "promotions": 0}

    # -- helpers ---------------------------------------------------------------
    @property
    def disk_dir(self) -> Path | None:
        return self._disk.root if self._disk is not None else None

    def key_for(self, token_ids, dtype: torch.dtype, extra: str = "") -> str:
        """:func:`chunk_key` with this store's model and RoPE identity."""
        return chunk_key(self.model_id, self.rope_id, dtype, token_ids, extra)

    def _copy_to(self, chunk: StoredChunk, tier: str) -> StoredChunk:
        kv = chunk.kv.detach()
        if tier == "gpu":
            dst = torch.empty(kv.shape, dtype=kv.dtype, device=self.device)
        else:
            dst = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=self.pin_memory)
        dst.copy_(kv)
        return StoredChunk(chunk.key, dst, chunk.positions, chunk.token_ids, dict(chunk.meta))

    def _insert(self, tier: _MemTier, chunk: StoredChunk) -> None:
        """Insert into a memory tier (lock held); GPU evictions move down to the CPU tier."""
        for victim in tier.insert(chunk):
            self._stats["evictions"][tier.name] += 1
            if tier is self._gpu and self._cpu.fits(victim.nbytes) and victim.key not in self._cpu.items:
                self._insert(self._cpu, self._copy_to(victim, "cpu"))

    def _report_corrupt(self, key: str, f) -> None:
        with self._lock:
            self._stats["corrupt"] += 1
        if self._disk is not None:
            self._disk.remove_if_same(key, f)

    def _promote_loaded(self, chunk: StoredChunk) -> None:
        with self._lock:
            if self._cpu.fits(chunk.nbytes) and chunk.key not in self._cpu.items:
                self._insert(self._cpu, chunk)
                self._stats["promotions"] += 1

    # -- public API ------------------------------------------------------------
    def put(self, key: str, kv: torch.Tensor, positions, token_ids=None, meta: dict | None = None) -> str:
        """Store a chunk; returns the (filesystem-safe) key it is stored under.

        ``kv`` ``[L, 2, T, H, D]`` on any device; ``positions`` ``[T]``. The data is copied.
        The chunk goes to the fastest memory tier with room (GPU when ``kv`` is on the
        GPU tier's device, else CPU) and, write-through, to disk.
        """
        key = _safe_key(key)
        if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"kv must be a [L, 2, T, H, D] tensor, got {getattr(kv, 'shape', type(kv))}")
        dtype_name(kv.dtype)
        positions = torch.as_tensor(positions).detach().to("cpu", torch.int64).reshape(-1).clone()
        if positions.numel() != kv.shape[2]:
            raise ValueError(f"positions has {positions.numel()} entries, kv has {kv.shape[2]} tokens")
        token_ids = (torch.zeros(0, dtype=torch.int64) if token_ids is None
                     else torch.as_tensor(token_ids).detach().to("cpu", torch.int64).reshape(-1).clone())
        chunk = StoredChunk(key, kv.detach(), positions, token_ids, dict(meta or {}))
        if self._disk is not None:
            try:
                self._disk.write(chunk)
                self._disk.enforce_budget(protect=key)
            except OSError:  # e.g. disk full: the chunk stays in memory only
                with self._lock:
                    self._stats["write_errors"] += 1
        with self._lock:
            self._stats["puts"] += 1
            if kv.device.type == "cuda" and self._gpu.fits(chunk.nbytes):
                self._insert(self._gpu, self._copy_to(chunk, "gpu"))
            elif self._cpu.fits(chunk.nbytes):
                self._insert(self._cpu, self._copy_to(chunk, "cpu"))
            elif self._gpu.fits(chunk.nbytes):
                self._insert(self._gpu, self._copy_to(chunk, "gpu"))
        return key

    def put_chunk(self, chunk) -> str:
        """Store any object with ``key``, ``kv``, ``positions`` (and optionally ``token_ids``, ``meta``)."""
        return self.put(chunk.key, chunk.kv, chunk.positions, getattr(chunk, "token_ids", None),
                        getattr(chunk, "meta", None))

    def where(self, key: str) -> str | None:
        """The fastest tier holding ``key`` (``"gpu"``, ``"cpu"``, ``"disk"``) or ``None``.
        Does not validate the file or change any LRU order."""
        key = _safe_key(key)
        with self._lock:
            if key in self._gpu.items:
                return "gpu"
            if key in self._cpu.items:
                return "cpu"
        if self._disk is not None and self._disk.path(key).exists():
            return "disk"
        return None

    def __contains__(self, key: str) -> bool:
        return self.where(key) is not None

    def get(self, key: str, device=None) -> StoredChunk | None:
        """The chunk, or ``None`` on a miss (including a corrupt file, which is removed).

        A hit is promoted into the memory tiers above it; ``device`` (optional) asks for
        ``kv`` on that device (copied if needed, and promoted into the GPU tier when it is
        the GPU tier's device). Never raises for a bad or missing file.
        """
        key = _safe_key(key)
        want = torch.device(device) if device is not None else None
        want_gpu = want is not None and want.type == "cuda" and self.device is not None
        with self._lock:
            item = self._gpu.get(key)
            if item is not None:
                self._stats["hits"]["gpu"] += 1
                return self._on_device(item, want)
            item = self._cpu.get(key)
            if item is not None:
                self._stats["hits"]["cpu"] += 1
                if want_gpu and self._gpu.fits(item.nbytes):
                    up = self._copy_to(item, "gpu")
                    self._insert(self._gpu, up)
                    self._stats["promotions"] += 1
                    return self._on_device(up, want)
                return self._on_device(item, want)
        item = self._get_disk(key)
        if item is None:
            with self._lock:
                self._stats["misses"] += 1
            return None
        with self._lock:
            self._stats["hits"]["disk"] += 1
            if want_gpu and self._gpu.fits(item.nbytes):
                up = self._copy_to(item, "gpu")
                self._insert(self._gpu, up)
                self._stats["promotions"] += 1
                if self._cpu.fits(item.nbytes):
                    self._insert(self._cpu, item)
                return self._on_device(up, want)
            if self._cpu.fits(item.nbytes):
                self._insert(self._cpu, item)
                self._stats["promotions"] += 1
        return self._on_device(item, want)

    @staticmethod
    def _on_device(item: StoredChunk, want) -> StoredChunk:
        if want is None or item.kv.device == want or (want.type == item.kv.device.type and want.index is None):
            return item
        return StoredChunk(item.key, item.kv.to(want), item.positions, item.token_ids, item.meta)

    def _get_disk(self, key: str) -> StoredChunk | None:
        if self._disk is None:
            return None
        f, h, corrupt = self._disk.open(key)
        if corrupt:
            with self._lock:
                self._stats["corrupt"] += 1
        if f is None:
            return None
        try:
            kv = torch.empty(h.shape, dtype=h.dtype, pin_memory=self.pin_memory)
            for l in range(h.shape[0]):
                _DiskTier.read_layer(f, h, l, kv[l])
            positions, token_ids = self._disk.read_tail(f, h)
        except (_Corrupt, OSError):
            self._report_corrupt(key, f)
            return None
        finally:
            f.close()
        self._disk.touch(key)
        return StoredChunk(key, kv, positions, token_ids, h.meta)

    def open(self, key: str) -> ChunkHandle | None:
        """Open ``key`` for layer-wise loading; ``None`` on a miss (a corrupt header is a
        miss and the file is removed). Layer payloads are verified as they are loaded."""
        key = _safe_key(key)
        with self._lock:
            for tier in (self._gpu, self._cpu):
                item = tier.get(key)
                if item is not None:
                    self._stats["hits"][tier.name] += 1
                    return ChunkHandle(self, key, tier.name, chunk=item)
        if self._disk is not None:
            f, h, corrupt = self._disk.open(key)
            if corrupt:
                with self._lock:
                    self._stats["corrupt"] += 1
            if f is not None:
                try:
                    positions, token_ids = self._disk.read_tail(f, h)
                except (_Corrupt, OSError):
                    self._report_corrupt(key, f)
                    f.close()
                else:
                    self._disk.touch(key)
                    with self._lock:
                        self._stats["hits"]["disk"] += 1
                    return ChunkHandle(self, key, "disk", file=f, header=h, positions=positions, token_ids=token_ids)
        with self._lock:
            self._stats["misses"] += 1
        return None

    def open_many(self, keys: Sequence[str]) -> list[ChunkHandle | None]:
        return [self.open(k) for k in keys]

    def remove(self, key: str) -> None:
        """Drop ``key`` from every tier."""
        key = _safe_key(key)
        with self._lock:
            self._gpu.remove(key)
            self._cpu.remove(key)
        if self._disk is not None:
            try:
                os.unlink(self._disk.path(key))
            except OSError:
                pass

    def clear(self, tiers: Sequence[str] = TIERS) -> None:
        """Empty the given tiers (default: all, including the files)."""
        with self._lock:
            if "gpu" in tiers:
                self._gpu.items.clear()
                self._gpu.bytes = 0
            if "cpu" in tiers:
                self._cpu.items.clear()
                self._cpu.bytes = 0
        if "disk" in tiers and self._disk is not None:
            for _, _, p in self._disk.entries():
                try:
                    os.unlink(p)
                except OSError:
                    pass
            self._disk._est_bytes = 0

    def keys(self, tier: str) -> list[str]:
        """Keys in ``tier``, least recently used first."""
        if tier == "disk":
            return self._disk.keys() if self._disk is not None else []
        with self._lock:
            return list((self._gpu if tier == "gpu" else self._cpu).items)

    def stats(self) -> dict:
        """Hit/miss/corrupt/eviction counters and the bytes held per tier."""
        with self._lock:
            out = json.loads(json.dumps(self._stats))
            out["bytes"] = {"gpu": self._gpu.bytes, "cpu": self._cpu.bytes}
            out["budgets"] = {"gpu": self._gpu.budget, "cpu": self._cpu.budget,
                              "disk": self._disk.budget if self._disk is not None else 0}
        out["bytes"]["disk"] = self._disk.total_bytes() if self._disk is not None else 0
        return out
