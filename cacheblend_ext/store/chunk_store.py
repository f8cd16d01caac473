"""Content-addressed chunk KV store: GPU memory -> CPU memory -> disk -> remote (Redis).

A stored chunk is the KV a model produced for one passage: ``kv`` ``[L, 2, T, H, D]``
(all layers, K after RoPE, then V), the absolute ``positions`` ``[T]`` it was computed
at, its ``token_ids`` and a little JSON ``meta``. Chunks are addressed by a *scope* and a
*key*. The key hashes everything the KV depends on
(:func:`cacheblend_ext.identity.chunk_key`: model identity, RoPE identity, dtype, prefix
ids and token ids), so any subset of chunks in any order can be reused; nothing assumes a
shared prefix. The scope (:func:`cacheblend_ext.identity.check_scope`: a tenant, a user,
or ``"public"``) says who may reuse it: every method that stores or looks up a chunk takes
``scope=`` and has no default, the same text in two scopes is two entries in every tier,
and a lookup never finds another scope's chunk (it costs what any miss costs). Sharing
across scopes happens only where a caller stores or looks up a chunk in a shared scope.

Tiers
-----
* **gpu**: tensors on the store's CUDA device (budget ``gpu_bytes``, 0 disables it);
* **cpu**: host tensors, page-locked (pinned) when CUDA is available so host-to-device
  copies run asynchronously (budget ``cpu_bytes``);
* **disk**: one file per chunk under ``disk_dir`` (budget ``disk_bytes``; ``None`` means
  unbounded), shared by every process on the host (:mod:`cacheblend_ext.store.disk`);
* **remote**: one value per chunk on a Redis server or Redis Cluster shared by every
  process and machine (``remote=``; :mod:`cacheblend_ext.store.remote`).

:meth:`ChunkStore.put` writes every configured persistent tier: the disk file always
(write-through), the remote value write-through by default or from a background thread
with ``remote_write="back"``. Each local tier keeps its own least-recently-used order
under its byte budget; the remote server evicts by its own ``maxmemory`` policy (an
evicted value is a plain miss). A hit in a lower tier promotes the chunk into the CPU
tier (and the GPU tier when asked for on its device); a chunk evicted from the GPU tier
moves down to the CPU tier.

Disk files and remote values share one format (:mod:`cacheblend_ext.store.chunk_format`): a
header with the key, the scope, the model and RoPE identity and a crc32 per layer, then
the layers, so a loader can fetch and verify one layer at a time. With ``mac_key`` every
value also carries keyed MAC tags over the header, each layer, the positions and the token
ids (:mod:`cacheblend_ext.store.integrity`), verified as each layer loads; a value with a
missing or wrong tag is refused like a corrupt one and counted in ``stats()["bad_mac"]``.

Failure handling
----------------
A file or value whose magic, version, header checksum, MAC, identity, scope, key, size or
payload checksum is wrong is a miss: it is removed (only if it is still the same file /
value: a concurrent writer may have replaced it with a good one) and counted in
``stats()["corrupt"]`` (and in ``stats()["bad_mac"]`` when its MAC was missing or wrong);
no exception reaches the caller of :meth:`ChunkStore.get` or :meth:`ChunkStore.open`. A
remote server that is absent, fails or times out is a miss too (counted in
``stats()["remote"]``), never a hang. While a chunk is loaded layer by layer, a payload
that fails its checksum or MAC raises :class:`ChunkCorruptError` (the file or
value is removed first) and a remote value that cannot be read any more raises
:class:`ChunkUnavailableError`; both are :class:`ChunkLoadError`, after which the request
should be retried with that chunk treated as uncached (``CachedBlender`` does).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Sequence

import torch

from ..identity import ModelIdentity, check_scope, hash_hex, scope_list
from . import chunk_format
from .chunk_format import FORMAT_VERSION, MAGIC, FormatError, MacError, byte_view, dtype_name
from .disk import FILE_SUFFIX, DiskTier
from .handle import ChunkCorruptError, ChunkHandle, ChunkLoadError, ChunkUnavailableError
from .integrity import make_mac
from .memory import MemoryTier, StoredChunk

TIERS = ("gpu", "cpu", "disk", "remote")
LOCAL_TIERS = ("gpu", "cpu", "disk")
_KEY_RE = re.compile(r"^[0-9A-Za-z_-]{1,128}$")


def _safe_key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"chunk key must be a str, got {type(key).__name__}")
    if _KEY_RE.match(key):
        return key
    return "h" + hash_hex([key.encode()], 20)


def _check_tiers(tiers: Sequence[str]) -> None:
    unknown = set(tiers) - set(TIERS)
    if unknown:
        raise ValueError(f"tiers must be among {TIERS}, got {sorted(unknown)}")


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------


class ChunkStore:
    """Tiered, content-addressed store of chunk KV (see the module docstring).

    Args:
        model_id, rope_id: identity of the model and RoPE table the KV belongs to
            (:class:`cacheblend_ext.identity.ModelIdentity`); recorded in every file and
            remote value and checked on every read.
        disk_dir: directory of the disk tier (``None``: no disk tier).
        gpu_bytes, cpu_bytes, disk_bytes: byte budgets per tier (``disk_bytes=None``:
            unbounded).
        device: CUDA device of the GPU tier (default: the current one when CUDA is
            available and ``gpu_bytes > 0``).
        pin_memory: page-lock CPU-tier tensors (default: when CUDA is available).
        fsync: ``fsync`` each file before publishing it (durable across power loss).
        remote: the remote tier: a URL (``redis://[user:password@]host:port/db``,
            ``rediss://`` for TLS, ``redis+cluster://host:port``, ``rediss+cluster://``,
            ...) or a ``redis.Redis`` / ``redis.cluster.RedisCluster`` client; ``None``: no
            remote tier.
        remote_write: ``"through"`` (``put`` returns after the remote write) or
            ``"back"`` (a background thread writes; see :meth:`flush`).
        write_back_bytes: most bytes queued for write-back before ``put`` waits.
        remote_namespace: first part of every remote key (keys are
            ``<namespace>:v<format>:<scope>:<model id>:<rope id>:<chunk key>``).
        remote_timeout_s, remote_connect_timeout_s: socket timeouts of every remote
            command (for a URL; a client object keeps its own).
        remote_retry_after_s: after a connection error or timeout the remote is skipped
            (misses, no writes) for this long.
        remote_ttl_s: expire remote values this many seconds after they were written.
        remote_in_flight: layers of requests kept in flight while streaming a request's
            chunks from the remote.
        remote_options: keyword arguments of the redis client for a URL (TLS:
            ``{"ssl_ca_certs": path}``, client certificates, ...).
        remote_scopes: the scopes whose chunks go to the remote tier (``None``: every
            scope); the others stay in the local tiers (neither written nor looked up
            remotely), e.g. ``("public",)`` keeps private documents off a shared server.
        mac_key: secret key (bytes, at least 16) of the keyed MAC that every file and
            remote value carries and every read verifies (``None``: crc32 only); it comes
            from the deployment's configuration, e.g.
            :func:`cacheblend_ext.store.integrity.mac_key_from_env`.
        mac_algorithm: ``"hmac-sha256"`` (default) or ``"blake2b"``.
    """

    def __init__(self, model_id: str = "", rope_id: str = "", *, disk_dir: str | os.PathLike | None = None,
                 gpu_bytes: int = 0, cpu_bytes: int = 1 << 30, disk_bytes: int | None = None,
                 device=None, pin_memory: bool | None = None, fsync: bool = False,
                 remote=None, remote_write: str = "through", write_back_bytes: int = 256 << 20,
                 remote_namespace: str = "cacheblend", remote_timeout_s: float = 2.0,
                 remote_connect_timeout_s: float = 1.0, remote_retry_after_s: float = 5.0,
                 remote_ttl_s: int | None = None, remote_in_flight: int = 4, remote_options: dict | None = None,
                 remote_scopes: Sequence[str] | None = None, mac_key: bytes | None = None,
                 mac_algorithm: str = "hmac-sha256"):
        if remote_write not in ("through", "back"):
            raise ValueError(f"remote_write must be 'through' or 'back', got {remote_write!r}")
        if isinstance(remote_scopes, str):
            raise ValueError(f"remote_scopes must be a sequence of scope names, got the string {remote_scopes!r}")
        self.remote_scopes = (frozenset(check_scope(s, "remote_scopes entry") for s in remote_scopes)
                              if remote_scopes is not None else None)
        self.mac = make_mac(mac_key, mac_algorithm)
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
        self._gpu = MemoryTier("gpu", gpu_bytes if self.device is not None else 0)
        self._cpu = MemoryTier("cpu", cpu_bytes)
        self._disk = (DiskTier(Path(disk_dir), disk_bytes, self.model_id, self.rope_id, fsync, self.mac)
                      if disk_dir is not None else None)
        self._remote = None
        self._write_back = None
        if remote is not None:
            from .remote import RedisTier, WriteBack

            self._remote = RedisTier(remote, self.model_id, self.rope_id, namespace=remote_namespace,
                                     timeout_s=remote_timeout_s, connect_timeout_s=remote_connect_timeout_s,
                                     retry_after_s=remote_retry_after_s, ttl_s=remote_ttl_s,
                                     in_flight=remote_in_flight, options=remote_options, mac=self.mac)
            if remote_write == "back":
                self._write_back = WriteBack(self._remote, write_back_bytes)
        self.remote_write = remote_write
        self._lock = threading.RLock()
        self._stats = {"hits": {t: 0 for t in TIERS}, "misses": 0, "corrupt": 0, "bad_mac": 0, "puts": 0,
                       "write_errors": 0,
                       "skipped_writes": 0, "load_failures": 0, "evictions": {t: 0 for t in LOCAL_TIERS},
                       "promotions": 0}

    # -- helpers ---------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.model_id, self.rope_id)

    @property
    def disk_dir(self) -> Path | None:
        return self._disk.root if self._disk is not None else None

    @property
    def remote(self):
        """The remote tier (:class:`cacheblend_ext.store.remote.RedisTier`) or ``None``."""
        return self._remote

    def chunk_path(self, key: str, *, scope: str) -> Path | None:
        """Where the disk file of ``key`` in ``scope`` lives (``None`` without a disk tier)."""
        return self._disk.path(check_scope(scope), _safe_key(key)) if self._disk is not None else None

    def _remote_for(self, scope: str):
        """The remote tier if ``scope``'s chunks go there, else ``None``."""
        if self._remote is None or (self.remote_scopes is not None and scope not in self.remote_scopes):
            return None
        return self._remote

    def key_for(self, token_ids, dtype: torch.dtype, prefix_ids=()) -> str:
        """The chunk key of ``token_ids`` (encoded after ``prefix_ids``) under this store's
        model and RoPE identity."""
        return self.identity.chunk_key(dtype, token_ids, prefix_ids)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _copy_to(self, chunk: StoredChunk, tier: str) -> StoredChunk:
        kv = chunk.kv.detach()
        if tier == "gpu":
            dst = torch.empty(kv.shape, dtype=kv.dtype, device=self.device)
        else:
            dst = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=self.pin_memory)
        dst.copy_(kv)
        return StoredChunk(chunk.key, dst, chunk.positions, chunk.token_ids, dict(chunk.meta), scope=chunk.scope)

    def _insert(self, tier: MemoryTier, chunk: StoredChunk) -> None:
        """Insert into a memory tier (lock held); GPU evictions move down to the CPU tier."""
        for victim in tier.insert(chunk):
            self._stats["evictions"][tier.name] += 1
            if tier is self._gpu and self._cpu.fits(victim.nbytes) and victim.address not in self._cpu.items:
                self._insert(self._cpu, self._copy_to(victim, "cpu"))

    # -- what a ChunkHandle reports while its chunk loads ----------------------------
    def record_load_failure(self) -> None:
        """A chunk could not be read to the end (remote gone or evicted): counted in
        ``stats()["load_failures"]``."""
        self._count("load_failures")

    def count_refused(self, exc: BaseException | None) -> None:
        """A file or remote value was refused by a check: counted in ``stats()["corrupt"]``,
        and in ``stats()["bad_mac"]`` when its MAC was missing or wrong."""
        with self._lock:
            self._stats["corrupt"] += 1
            if isinstance(exc, MacError):
                self._stats["bad_mac"] += 1

    def discard_corrupt(self, reader, exc: BaseException | None = None) -> None:
        """A file or remote value failed a check (``exc``): count it (:meth:`count_refused`)
        and remove it through ``reader`` (the disk or remote reader that read it), only if
        it is still the one that was read."""
        self.count_refused(exc)
        if reader is not None:
            reader.discard()

    def promote(self, chunk: StoredChunk) -> None:
        """Keep a chunk that was loaded from disk or the remote in the CPU tier, if it fits
        and is not there yet."""
        with self._lock:
            if self._cpu.fits(chunk.nbytes) and chunk.address not in self._cpu.items:
                self._insert(self._cpu, chunk)
                self._stats["promotions"] += 1

    # -- writing -------------------------------------------------------------------
    def put(self, key: str, kv: torch.Tensor, positions, token_ids=None, meta: dict | None = None, *,
            scope: str) -> str:
        """Store a chunk in ``scope``; returns the (filesystem-safe) key it is stored under.

        ``kv`` ``[L, 2, T, H, D]`` on any device; ``positions`` ``[T]``. The data is copied.
        The chunk goes to the fastest memory tier with room (GPU when ``kv`` is on the
        GPU tier's device, else CPU), to disk (write-through) and to the remote tier
        (write-through, or queued with ``remote_write="back"``; only for the
        ``remote_scopes``). A tier that cannot take it (disk full, remote down or refusing
        the write) is counted in ``stats()["write_errors"]``; the chunk stays in the others.
        """
        key, scope = _safe_key(key), check_scope(scope)
        if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"kv must be a [L, 2, T, H, D] tensor, got {getattr(kv, 'shape', type(kv))}")
        dtype_name(kv.dtype)
        positions = torch.as_tensor(positions).detach().to("cpu", torch.int64).reshape(-1).clone()
        if positions.numel() != kv.shape[2]:
            raise ValueError(f"positions has {positions.numel()} entries, kv has {kv.shape[2]} tokens")
        token_ids = (torch.zeros(0, dtype=torch.int64) if token_ids is None
                     else torch.as_tensor(token_ids).detach().to("cpu", torch.int64).reshape(-1).clone())
        chunk = StoredChunk(key, kv.detach(), positions, token_ids, dict(meta or {}), scope=scope)
        remote = self._remote_for(scope)
        if self._disk is not None or remote is not None:
            encoded = chunk_format.encode(key, scope, chunk.kv, positions, token_ids, chunk.meta, self.model_id,
                                          self.rope_id, self.mac)
            if self._disk is not None:
                self._put_disk(scope, key, encoded)
            if remote is not None:
                self._put_remote(scope, key, encoded)
        with self._lock:
            self._stats["puts"] += 1
            if kv.device.type == "cuda" and self._gpu.fits(chunk.nbytes):
                self._insert(self._gpu, self._copy_to(chunk, "gpu"))
            elif self._cpu.fits(chunk.nbytes):
                self._insert(self._cpu, self._copy_to(chunk, "cpu"))
            elif self._gpu.fits(chunk.nbytes):
                self._insert(self._gpu, self._copy_to(chunk, "gpu"))
        return key

    def _put_disk(self, scope: str, key: str, encoded) -> None:
        try:
            if self._disk.write(scope, key, encoded) == "no_room":
                self._count("skipped_writes")
        except OSError:  # e.g. disk full: the chunk stays in the other tiers
            self._count("write_errors")

    def _put_remote(self, scope: str, key: str, encoded) -> None:
        from .remote import RemoteError

        value = encoded.to_bytes()
        if self._write_back is not None:
            self._write_back.submit(scope, key, value)
            return
        try:
            self._remote.write(scope, key, value)
        except RemoteError:
            self._count("write_errors")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued remote writes (``remote_write="back"``) were sent; False on timeout."""
        return self._write_back.flush(timeout) if self._write_back is not None else True

    def close(self) -> None:
        """Send queued remote writes and stop the writer thread."""
        if self._write_back is not None:
            self._write_back.close()
            self._write_back = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- lookups -----------------------------------------------------------------------
    def where(self, key: str, *, scope: str) -> str | None:
        """The fastest tier holding ``key`` in ``scope`` (``"gpu"``, ``"cpu"``, ``"disk"``,
        ``"remote"``) or ``None``. Does not validate the file or value or change any LRU
        order."""
        key, scope = _safe_key(key), check_scope(scope)
        address = (scope, key)
        with self._lock:
            if address in self._gpu.items:
                return "gpu"
            if address in self._cpu.items:
                return "cpu"
        if self._disk is not None and self._disk.path(scope, key).exists():
            return "disk"
        remote = self._remote_for(scope)
        if remote is not None and remote.exists(scope, key):
            return "remote"
        return None

    def __contains__(self, address) -> bool:
        """``(scope, key) in store``: whether any tier holds it."""
        if not (isinstance(address, tuple) and len(address) == 2):
            raise TypeError("test membership with a (scope, key) tuple: a key alone names no chunk")
        return self.where(address[1], scope=address[0]) is not None

    def get(self, key: str, device=None, *, scope: str) -> StoredChunk | None:
        """The chunk ``key`` of ``scope``, or ``None`` on a miss (including a corrupt or
        forged file or value, which is removed, and an unreachable remote).

        A hit is promoted into the memory tiers above it; ``device`` (optional) asks for
        ``kv`` on that device (copied if needed, and promoted into the GPU tier when it is
        the GPU tier's device). Never raises for a bad or missing file or value.
        """
        key, scope = _safe_key(key), check_scope(scope)
        address = (scope, key)
        want = torch.device(device) if device is not None else None
        want_gpu = want is not None and want.type == "cuda" and self.device is not None
        with self._lock:
            item = self._gpu.get(address)
            if item is not None:
                self._stats["hits"]["gpu"] += 1
                return self._on_device(item, want)
            item = self._cpu.get(address)
            if item is not None:
                self._stats["hits"]["cpu"] += 1
                if want_gpu and self._gpu.fits(item.nbytes):
                    up = self._copy_to(item, "gpu")
                    self._insert(self._gpu, up)
                    self._stats["promotions"] += 1
                    return self._on_device(up, want)
                return self._on_device(item, want)
        tier, item = "disk", self._get_disk(scope, key)
        if item is None:
            tier, item = "remote", self._get_remote(scope, key)
        if item is None:
            self._count("misses")
            return None
        with self._lock:
            self._stats["hits"][tier] += 1
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
        return StoredChunk(item.key, item.kv.to(want), item.positions, item.token_ids, item.meta, scope=item.scope)

    def _get_disk(self, scope: str, key: str) -> StoredChunk | None:
        if self._disk is None:
            return None
        reader, refused = self._disk.open(scope, key)
        if refused is not None:
            self.count_refused(refused)
        if reader is None:
            return None
        h = reader.header
        try:
            kv = torch.empty(h.shape, dtype=h.dtype, pin_memory=self.pin_memory)
            for l in range(h.num_layers):
                reader.read_layer(l, kv[l])
            positions, token_ids = reader.read_tail()
        except (FormatError, OSError) as exc:
            self.discard_corrupt(reader, exc)
            return None
        finally:
            reader.close()
        self._disk.touch(scope, key)
        return StoredChunk(key, kv, positions, token_ids, h.meta, scope=scope)

    def _get_remote(self, scope: str, key: str) -> StoredChunk | None:
        remote = self._remote_for(scope)
        if remote is None:
            return None
        found = remote.read_whole(scope, key)
        if isinstance(found, FormatError):
            self.count_refused(found)
            return None
        if found is None:
            return None
        h, data, positions, token_ids = found
        kv = torch.empty(h.shape, dtype=h.dtype, pin_memory=self.pin_memory)
        byte_view(kv)[:] = memoryview(data)[h.data_offset:h.tail_offset]
        return StoredChunk(key, kv, positions, token_ids, h.meta, scope=scope)

    def open(self, key: str, *, scope: str) -> ChunkHandle | None:
        """Open ``key`` of ``scope`` for layer-wise loading; ``None`` on a miss (a corrupt or
        forged header is a miss and the file or value is removed). Payloads are verified as
        they are loaded."""
        return self.open_many([key], scope=scope)[0]

    def open_many(self, keys: Sequence[str], *, scope) -> list[ChunkHandle | None]:
        """:meth:`open` for several keys; ``scope`` is one scope for all of them or one per
        key. The remote ones are looked up in one batch."""
        scopes = scope_list(scope, len(keys))
        keys = [_safe_key(k) for k in keys]
        out: list = [self._open_local(s, k) for s, k in zip(scopes, keys)]
        todo = [i for i, h in enumerate(out) if h is None and self._remote_for(scopes[i]) is not None]
        if todo:
            for i, found in zip(todo, self._remote.open_many([(scopes[i], keys[i]) for i in todo])):
                if isinstance(found, FormatError):
                    self.count_refused(found)
                elif found is not None:
                    out[i] = ChunkHandle(self, scopes[i], keys[i], "remote", reader=found, positions=found.positions,
                                         token_ids=found.token_ids)
        with self._lock:
            for h in out:
                if h is None:
                    self._stats["misses"] += 1
                else:
                    self._stats["hits"][h.tier] += 1
        return out

    def _open_local(self, scope: str, key: str) -> ChunkHandle | None:
        with self._lock:
            for tier in (self._gpu, self._cpu):
                item = tier.get((scope, key))
                if item is not None:
                    return ChunkHandle(self, scope, key, tier.name, chunk=item)
        if self._disk is None:
            return None
        reader, refused = self._disk.open(scope, key)
        if refused is not None:
            self.count_refused(refused)
        if reader is None:
            return None
        try:
            positions, token_ids = reader.read_tail()
        except (FormatError, OSError) as exc:
            self.discard_corrupt(reader, exc)
            reader.close()
            return None
        self._disk.touch(scope, key)
        return ChunkHandle(self, scope, key, "disk", reader=reader, positions=positions, token_ids=token_ids)

    # -- removal and inspection -----------------------------------------------------------
    def remove(self, key: str, tiers: Sequence[str] = TIERS, *, scope: str) -> None:
        """Drop ``key`` of ``scope`` from the given tiers (default: every tier, the remote
        value included)."""
        key, scope = _safe_key(key), check_scope(scope)
        _check_tiers(tiers)
        with self._lock:
            if "gpu" in tiers:
                self._gpu.remove((scope, key))
            if "cpu" in tiers:
                self._cpu.remove((scope, key))
        if "disk" in tiers and self._disk is not None:
            self._disk.remove(scope, key)
        if "remote" in tiers and self._remote is not None:
            self._remote.delete(scope, key)

    def clear(self, tiers: Sequence[str] = LOCAL_TIERS, *, scope: str | None = None) -> None:
        """Empty the given tiers (default: the local ones, files included; the shared remote
        tier only when named) of every scope, or of ``scope`` only."""
        _check_tiers(tiers)
        if scope is not None:
            check_scope(scope)
        with self._lock:
            if "gpu" in tiers:
                self._gpu.clear(scope)
            if "cpu" in tiers:
                self._cpu.clear(scope)
        if "disk" in tiers and self._disk is not None:
            self._disk.clear(scope)
        if "remote" in tiers and self._remote is not None:
            self._remote.clear(scope)

    def keys(self, tier: str, *, scope: str) -> list[str]:
        """Keys of ``scope`` in ``tier``, least recently used first (remote: sorted)."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        scope = check_scope(scope)
        if tier == "disk":
            return self._disk.keys(scope) if self._disk is not None else []
        if tier == "remote":
            return self._remote.keys(scope) if self._remote is not None else []
        with self._lock:
            return [k for s, k in (self._gpu if tier == "gpu" else self._cpu).items if s == scope]

    def peek(self, key: str, tier: str, *, scope: str) -> StoredChunk | None:
        """The chunk as the memory tier ``tier`` (``"gpu"`` or ``"cpu"``) holds it, or
        ``None``; counts no hit and changes no LRU order (for inspection)."""
        if tier not in ("gpu", "cpu"):
            raise ValueError(f"tier must be 'gpu' or 'cpu', got {tier!r}")
        address = (check_scope(scope), _safe_key(key))
        with self._lock:
            return (self._gpu if tier == "gpu" else self._cpu).items.get(address)

    def stats(self) -> dict:
        """Hit/miss/corrupt/bad-MAC/eviction counters, the bytes held per local tier and the
        remote tier's counters (``"remote"``: errors, timeouts, writes, bytes moved, ...)."""
        with self._lock:
            out = json.loads(json.dumps(self._stats))
            out["bytes"] = {"gpu": self._gpu.bytes, "cpu": self._cpu.bytes}
            out["budgets"] = {"gpu": self._gpu.budget, "cpu": self._cpu.budget,
                              "disk": self._disk.budget if self._disk is not None else 0}
        out["bytes"]["disk"] = self._disk.total_bytes() if self._disk is not None else 0
        if self._disk is not None:
            out["evictions"]["disk"] = self._disk.evicted
        if self._remote is not None:
            out["remote"] = self._remote.counters_snapshot()
            out["remote"]["pending_writes"] = self._write_back.pending() if self._write_back is not None else 0
            out["remote"]["down"] = self._remote.is_down()
        return out


__all__ = ["FILE_SUFFIX", "FORMAT_VERSION", "MAGIC", "TIERS", "ChunkCorruptError", "ChunkHandle", "ChunkLoadError",
           "ChunkStore", "ChunkUnavailableError", "StoredChunk", "dtype_name"]
