"""Layer-wise pipelined loading of stored chunk KV.

A *layer source* hands the blend engine the reused KV one layer at a time (the protocol:
:mod:`cacheblend_ext.layer_source`). :class:`StoreLayerSource` is the one that loads from
:class:`cacheblend_ext.store.ChunkStore` handles:

* chunks already on the compute device (GPU tier, or the CPU tier when computing on the
  CPU) are returned as views, with no load at all;
* on a GPU, host chunks (CPU tier, pinned) are copied to a ring of ``depth + 1`` staging
  buffers on a side CUDA stream by a loader thread, up to ``depth`` layers ahead of the
  consumer. Each copy records an event; ``layer(l)`` makes the *current* stream wait on
  layer ``l``'s event (no host synchronisation), and the side stream waits on an event
  recorded when the consumer moved past a slot before overwriting it;
* disk chunks are read (and checksum-verified, layer by layer) by the same loader thread
  into a host buffer, as far ahead as the disk allows, then copied as above on a GPU or
  returned directly on the CPU;
* remote (Redis) chunks likewise, fetched by the loader thread with
  :class:`cacheblend_ext.store.remote.RemoteLayerStream`: the requests of the next
  ``remote_in_flight`` layers (a store setting) are pipelined on one connection per
  server, and each layer is handed over as soon as its replies arrived and passed their
  checksums. A fully loaded disk or remote chunk is promoted to the CPU tier.

With ``pipelined=False`` every layer is loaded when it is asked for and the host waits
for it (the per-layer synchronisation of public implementations; remote requests are
sent one layer at a time), which is the baseline the pipelined mode is measured against.

:meth:`StoreLayerSource.report` says how much load time the request had and how much of
it was hidden behind compute: ``load_ms`` sums the per-layer load work (disk and remote
reads plus host-to-device copies, timed with CUDA events on the side stream; per tier in
``tier_load_ms`` / ``tier_bytes``), ``exposed_ms`` sums the
time the consumer waited for data (host waits in ``layer()`` plus device-side stalls of the
compute stream on the copy events), and ``hidden_ms = load_ms - exposed_ms``.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import torch

from ..layer_source import LoadReport
from .chunk_store import ChunkCorruptError, ChunkHandle, ChunkLoadError, ChunkStore


class StoreLayerSource:
    """Layer source over opened store chunks (see the module docstring).

    Args:
        handles: :class:`ChunkHandle` objects from :meth:`ChunkStore.open` (all with the
            same number of layers, heads and head dim); the source closes them.
        device: the compute device the engine runs on.
        pipelined: load ahead in the background (default) or on demand.
        depth: how many layers ahead host-to-device copies may run (GPU).
    """

    def __init__(self, handles: Sequence[ChunkHandle], device, *, pipelined: bool = True, depth: int = 1):
        if any(h is None for h in handles):
            raise ValueError("every handle must be open (ChunkStore.open returned None for a missing chunk)")
        self.handles = list(handles)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.pipelined = bool(pipelined)
        self.depth = max(1, int(depth))
        self.positions = [h.positions for h in self.handles]
        self.keys = [h.key for h in self.handles]
        layers = {h.num_layers for h in self.handles}
        if len(layers) > 1:
            raise ValueError(f"chunks have different numbers of layers: {sorted(layers)}")
        self.num_layers = layers.pop() if layers else 0
        L = self.num_layers

        # Classify: direct views, host->device copies, disk and remote reads.
        self._direct, self._copy, self._disk, self._remote = [], [], [], []
        for i, h in enumerate(self.handles):
            if h.tier in ("disk", "remote"):
                (self._disk if h.tier == "disk" else self._remote).append(i)
                if self.cuda:
                    self._copy.append(i)
            elif h.kv.device == self.device or not self.cuda:
                self._direct.append(i)  # (a GPU-tier chunk read on the CPU is copied in layer())
            else:
                self._copy.append(i)
        self._streamed = self._disk + self._remote  # read into host buffers by the loader
        self._bytes_per_layer = sum(self.handles[i].layer_nbytes for i in set(self._copy) | set(self._streamed))
        self._stream = None  # RemoteLayerStream, opened by the first remote read

        # Timing.
        self._read_ms = [0.0] * L
        self._tier_ms = {"disk": [0.0] * L, "remote": [0.0] * L}
        self._host_wait_ms = [0.0] * L
        self._copy_events: list = [None] * L  # (start, end) timing events on the side stream
        self._sync_copy_ms = [0.0] * L
        self._stall_events: list = [None] * L  # (before, after) on the compute stream

        # Synchronisation state.
        self._cond = threading.Condition()
        self._consumer_at = -1
        self._loaded = [False] * L  # layer ready on the host side (read, and copy issued on GPU)
        self._error: BaseException | None = None
        self._error_layer = L
        self._closed = False
        self._thread = None

        self._nslots = self.depth + 1
        self._ready_events: list = [None] * L
        self._free_events: list = [None] * L
        self._free_upto = 0
        if self.cuda and self._copy:
            self._side = torch.cuda.Stream(self.device)
            cur = torch.cuda.current_stream(self.device)
            self._slots = [[torch.empty(self.handles[i].shape[1:], dtype=self.handles[i].dtype, device=self.device)
                            for i in self._copy] for _ in range(self._nslots if self.pipelined else 1)]
            self._init_event = cur.record_event()  # buffers allocated on the current stream
        else:
            self._slots = None

        if self.pipelined and (self._streamed or (self.cuda and self._copy)):
            self._thread = threading.Thread(target=self._loader, name="cacheblend-kv-loader", daemon=True)
            self._thread.start()
        elif not self._streamed and not (self.cuda and self._copy):
            self._loaded = [True] * L

    # -- loader thread ---------------------------------------------------------
    def _read_layer(self, l: int) -> None:
        t0 = time.perf_counter()
        for i in self._disk:
            self.handles[i].load_layer(l)
        t1 = time.perf_counter()
        if self._remote:
            self._read_remote_layer(l)
        t2 = time.perf_counter()
        self._tier_ms["disk"][l] = (t1 - t0) * 1e3
        self._tier_ms["remote"][l] = (t2 - t1) * 1e3
        self._read_ms[l] = (t2 - t0) * 1e3

    def _read_remote_layer(self, l: int) -> None:
        handles = [self.handles[i] for i in self._remote]
        if self._stream is None:
            from .remote import RemoteLayerStream

            remote = handles[0].store.remote
            window = remote.in_flight if self.pipelined else 1
            self._stream = RemoteLayerStream(remote, handles, window)
        try:
            self._stream.read_layer(l)
        except Exception as exc:
            raise handles[getattr(exc, "chunk_index", 0)].failure(exc) from None
        for h in handles:
            h.layer_loaded()

    def _finish_streamed(self) -> None:
        for i in self._streamed:
            self.handles[i].finish()

    def _host_view(self, i: int, l: int) -> torch.Tensor:
        h = self.handles[i]
        return h.host_kv[l] if h.reader is not None else h.kv[l]

    def _issue_copy(self, l: int) -> None:
        """Queue layer ``l``'s host->device copies on the side stream (loader thread)."""
        slot = l % self._nslots
        side = self._side
        with torch.cuda.device(self.device), torch.cuda.stream(side):
            if l == 0:
                side.wait_event(self._init_event)
            if l - self._nslots >= 0:
                side.wait_event(self._free_events[l - self._nslots])
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(side)
            for j, i in enumerate(self._copy):
                self._slots[slot][j].copy_(self._host_view(i, l), non_blocking=True)
            end.record(side)
        self._copy_events[l] = (start, end)
        self._ready_events[l] = end

    def _loader(self) -> None:
        try:
            for l in range(self.num_layers):
                if self._closed:
                    return
                if self._streamed:
                    self._read_layer(l)
                if self.cuda and self._copy:
                    with self._cond:  # the slot's previous layer must have been handed out
                        while self._consumer_at < l - self.depth and not self._closed:
                            self._cond.wait()
                        if self._closed:
                            return
                    self._issue_copy(l)
                with self._cond:
                    self._loaded[l] = True
                    self._cond.notify_all()
            self._finish_streamed()
        except BaseException as exc:  # reported to the consumer by layer()
            with self._cond:
                self._error = exc
                self._error_layer = next((k for k, ok in enumerate(self._loaded) if not ok), self.num_layers)
                self._cond.notify_all()

    # -- consumer side ---------------------------------------------------------
    def layer(self, l: int) -> list[torch.Tensor]:
        """Layer ``l`` of every chunk, ``[2, T_i, H, D]`` on the compute device.

        Raises :class:`ChunkCorruptError` if a stored chunk fails its checksum (the file
        or value has been removed) and :class:`ChunkUnavailableError` if a remote chunk
        cannot be read to the end: retry the request with that chunk treated as uncached."""
        if not 0 <= l < self.num_layers:
            raise IndexError(f"layer {l} out of range [0, {self.num_layers})")
        cur = torch.cuda.current_stream(self.device) if self.cuda else None
        t0 = time.perf_counter()
        if self.pipelined:
            with self._cond:
                if cur is not None:
                    # the consumer is done enqueuing work on every layer before l
                    while self._free_upto < l:
                        self._free_events[self._free_upto] = cur.record_event()
                        self._free_upto += 1
                self._consumer_at = max(self._consumer_at, l)
                self._cond.notify_all()
                while not self._loaded[l] and not (self._error is not None and self._error_layer <= l):
                    self._cond.wait()
                if not self._loaded[l]:
                    raise self._error
            self._host_wait_ms[l] = (time.perf_counter() - t0) * 1e3
            if cur is not None and self._copy:
                before = torch.cuda.Event(enable_timing=True)
                after = torch.cuda.Event(enable_timing=True)
                before.record(cur)
                cur.wait_event(self._ready_events[l])
                after.record(cur)
                self._stall_events[l] = (before, after)
        else:
            self._load_sync(l, cur)
        return self._layer_tensors(l)

    def _load_sync(self, l: int, cur) -> None:
        if self._streamed:
            self._read_layer(l)
            if l == self.num_layers - 1:
                self._finish_streamed()
        if cur is not None and self._copy:
            cur.synchronize()  # the previous layer's work is done: the single slot is free
            t0 = time.perf_counter()
            for j, i in enumerate(self._copy):
                self._slots[0][j].copy_(self._host_view(i, l))
            cur.synchronize()
            self._sync_copy_ms[l] = (time.perf_counter() - t0) * 1e3
        self._loaded[l] = True

    def _layer_tensors(self, l: int) -> list[torch.Tensor]:
        out: list = [None] * len(self.handles)
        for i in self._direct:
            out[i] = self.handles[i].kv[l].to(self.device)
        if self.cuda and self._copy:
            slot = l % self._nslots if self.pipelined else 0
            for j, i in enumerate(self._copy):
                out[i] = self._slots[slot][j]
        else:
            for i in self._streamed:
                out[i] = self.handles[i].host_kv[l]
        return out

    # -- lifecycle and reporting ----------------------------------------------
    def close(self) -> None:
        """Stop the loader and close the chunk files (call after the request's last layer)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._slots is not None:
            # copies issued for layers nobody consumed must finish before the staging
            # buffers can be reused by the compute stream
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        for h in self.handles:
            h.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def report(self) -> LoadReport:
        """Load and exposed time of the layers consumed so far (synchronises with the
        recorded CUDA events, so call it after the request)."""
        L = self.num_layers
        load = list(self._read_ms)
        exposed = list(self._host_wait_ms) if self.pipelined else list(self._read_ms)
        for l in range(L):
            if self._copy_events[l] is not None:
                s, e = self._copy_events[l]
                e.synchronize()
                load[l] += s.elapsed_time(e)
            if self._stall_events[l] is not None:
                b, a = self._stall_events[l]
                a.synchronize()
                exposed[l] += b.elapsed_time(a)
            if not self.pipelined:
                load[l] += self._sync_copy_ms[l]
                exposed[l] += self._sync_copy_ms[l]
        load_ms, exposed_ms = sum(load), sum(exposed)
        hidden = max(0.0, load_ms - exposed_ms)
        tiers: dict = {}
        for h in self.handles:
            tiers[h.tier] = tiers.get(h.tier, 0) + 1
        consumed = sum(1 for ok in self._loaded if ok)
        tier_bytes = {t: sum(self.handles[i].layer_nbytes for i in idx) * consumed
                      for t, idx in (("disk", self._disk), ("remote", self._remote)) if idx}
        tier_ms = {t: sum(self._tier_ms[t]) for t in tier_bytes}
        return LoadReport(
            mode="pipelined" if self.pipelined else "sync", device=str(self.device), num_layers=L,
            num_chunks=len(self.handles), tiers=tiers, bytes_loaded=self._bytes_per_layer * L,
            load_ms=load_ms, exposed_ms=min(exposed_ms, load_ms),  # waits can only expose actual loading
            hidden_ms=hidden, hidden_fraction=(hidden / load_ms) if load_ms > 0 else 1.0,
            load_ms_per_layer=load, exposed_ms_per_layer=exposed, tier_load_ms=tier_ms, tier_bytes=tier_bytes,
        )


def open_layer_source(store: ChunkStore, keys: Sequence[str], device, *, pipelined: bool = True,
                      depth: int = 1) -> tuple[StoreLayerSource, list[int]]:
    """Open ``keys`` in ``store`` and build a layer source over the ones found.

    Returns ``(source, missing)`` where ``missing`` lists the indices of ``keys`` that were
    not in the store (or were corrupt); the source's chunks are the remaining keys, in order.
    """
    opened = store.open_many(keys)
    handles = [h for h in opened if h is not None]
    missing = [i for i, h in enumerate(opened) if h is None]
    return StoreLayerSource(handles, device, pipelined=pipelined, depth=depth), missing


__all__ = ["ChunkCorruptError", "ChunkLoadError", "LoadReport", "StoreLayerSource", "open_layer_source"]
