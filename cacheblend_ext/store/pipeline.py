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
  :class:`cacheblend_ext.store.remote_stream.RemoteLayerStream`: the requests of the next
  ``remote_in_flight`` layers (a store setting) are pipelined on one connection per
  server, and each layer is handed over as soon as its replies arrived and passed their
  checksums (or, with a MAC key, their MAC tags: verified here, on the loader thread,
  while the engine computes). A fully loaded disk or remote chunk is promoted to the CPU
  tier.

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
from dataclasses import dataclass
from typing import Sequence

import torch

from ..layer_source import LoadReport
from .chunk_store import ChunkStore
from .handle import ChunkCorruptError, ChunkHandle, ChunkLoadError


@dataclass
class _LayerTimes:
    """Per-layer times (ms) that :meth:`StoreLayerSource.report` sums, and the CUDA events
    it resolves into times after the request."""

    read_ms: list  # disk and remote reads
    tier_ms: dict  # the same, per tier
    host_wait_ms: list  # the consumer waiting in layer()
    sync_copy_ms: list  # host-to-device copies made on demand (pipelined=False)
    copy_events: list  # (start, end) of a layer's copies on the side stream
    stall_events: list  # (before, after) the compute stream's wait for a layer's copies

    @classmethod
    def empty(cls, num_layers: int) -> "_LayerTimes":
        L = num_layers
        return cls([0.0] * L, {"disk": [0.0] * L, "remote": [0.0] * L}, [0.0] * L, [0.0] * L, [None] * L,
                   [None] * L)


class _StagingRing:
    """The GPU buffers that host chunks are copied into: ``sets`` rotating sets of one
    layer each (``depth + 1`` when pipelined, one when loading on demand), filled on a side
    stream. Layer ``l``'s copies record ``ready[l]``, which the compute stream waits on; a
    set is refilled for layer ``l`` only after ``free[l - sets]``, which the consumer
    records when it moves past that layer."""

    def __init__(self, device: torch.device, handles: Sequence[ChunkHandle], num_layers: int, sets: int):
        self.device = device
        self.side = torch.cuda.Stream(device)
        cur = torch.cuda.current_stream(device)
        self.slots = [[torch.empty(h.shape[1:], dtype=h.dtype, device=device) for h in handles] for _ in range(sets)]
        self.allocated = cur.record_event()  # buffers allocated on the current stream
        self.ready: list = [None] * num_layers
        self.free: list = [None] * num_layers
        self.free_upto = 0

    def buffers(self, l: int) -> list[torch.Tensor]:
        """The set of buffers that holds layer ``l``."""
        return self.slots[l % len(self.slots)]

    def issue_copy(self, l: int, host_layers: Sequence[torch.Tensor]) -> tuple:
        """Queue layer ``l``'s host->device copies on the side stream (loader thread);
        returns their (start, end) timing events."""
        sets = len(self.slots)
        side = self.side
        with torch.cuda.device(self.device), torch.cuda.stream(side):
            if l == 0:
                side.wait_event(self.allocated)
            if l - sets >= 0:
                side.wait_event(self.free[l - sets])
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(side)
            for buf, src in zip(self.buffers(l), host_layers):
                buf.copy_(src, non_blocking=True)
            end.record(side)
        self.ready[l] = end
        return start, end

    def consumer_reached(self, l: int, cur) -> None:
        """The consumer is done enqueuing work on every layer before ``l`` (call under the
        source's lock, before the loader can see the new position)."""
        while self.free_upto < l:
            self.free[self.free_upto] = cur.record_event()
            self.free_upto += 1

    def wait_ready(self, l: int, cur) -> tuple:
        """Make the compute stream wait for layer ``l``'s copies; returns timing events
        around the wait."""
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        before.record(cur)
        cur.wait_event(self.ready[l])
        after.record(cur)
        return before, after

    def release(self) -> None:
        """Copies issued for layers nobody consumed must finish before the compute stream
        can reuse the buffers' memory."""
        torch.cuda.current_stream(self.device).wait_stream(self.side)


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
        self.scopes = [h.scope for h in self.handles]
        layers = {h.num_layers for h in self.handles}
        if len(layers) > 1:
            raise ValueError(f"chunks have different numbers of layers: {sorted(layers)}")
        self.num_layers = layers.pop() if layers else 0
        self._route_chunks()
        self._bytes_per_layer = sum(self.handles[i].layer_nbytes for i in set(self._copy) | set(self._streamed))
        self._stream = None  # RemoteLayerStream, opened by the first remote read
        self._times = _LayerTimes.empty(self.num_layers)

        # What the loader thread and the consumer share, under _cond.
        self._cond = threading.Condition()
        self._consumer_at = -1
        self._loaded = [False] * self.num_layers  # layer ready on the host side (read, and copy issued on GPU)
        self._error: BaseException | None = None
        self._error_layer = self.num_layers
        self._closed = False
        self._thread = None

        # Inference mode is thread-local: the loader thread copies into buffers made here, so
        # it must run in the same mode (a copy into an inference tensor outside inference
        # mode raises).
        self._inference = torch.is_inference_mode_enabled()
        self._staging = None
        if self.cuda and self._copy:
            self._staging = _StagingRing(self.device, [self.handles[i] for i in self._copy], self.num_layers,
                                         self.depth + 1 if self.pipelined else 1)
        if self.pipelined and (self._streamed or self._staging is not None):
            self._thread = threading.Thread(target=self._loader, name="cacheblend-kv-loader", daemon=True)
            self._thread.start()
        elif not self._streamed and self._staging is None:
            self._loaded = [True] * self.num_layers

    def _route_chunks(self) -> None:
        """Sort the chunks by how their layers reach the device: views of KV already there
        (``_direct``), host->device copies (``_copy``), and reads from disk or the remote
        into host buffers (``_disk``, ``_remote``; ``_streamed`` is both)."""
        self._direct, self._copy, self._disk, self._remote = [], [], [], []
        for i, h in enumerate(self.handles):
            if h.tier in ("disk", "remote"):
                (self._disk if h.tier == "disk" else self._remote).append(i)
                if self.cuda:
                    self._copy.append(i)
            elif h.device == self.device or not self.cuda:
                self._direct.append(i)  # (a GPU-tier chunk read on the CPU is copied in layer())
            else:
                self._copy.append(i)
        self._streamed = self._disk + self._remote  # read into host buffers by the loader

    # -- loader thread ---------------------------------------------------------
    def _read_layer(self, l: int) -> None:
        t0 = time.perf_counter()
        for i in self._disk:
            self.handles[i].load_layer(l)
        t1 = time.perf_counter()
        if self._remote:
            self._read_remote_layer(l)
        t2 = time.perf_counter()
        self._times.tier_ms["disk"][l] = (t1 - t0) * 1e3
        self._times.tier_ms["remote"][l] = (t2 - t1) * 1e3
        self._times.read_ms[l] = (t2 - t0) * 1e3

    def _read_remote_layer(self, l: int) -> None:
        handles = [self.handles[i] for i in self._remote]
        if self._stream is None:  # pipelined: the store's remote_in_flight layers of requests
            self._stream = ChunkHandle.remote_stream(handles, None if self.pipelined else 1)
        try:
            self._stream.read_layer(l)
        except Exception as exc:
            raise handles[getattr(exc, "chunk_index", 0)].failure(exc) from None
        for h in handles:
            h.layer_loaded()

    def _finish_streamed(self) -> None:
        for i in self._streamed:
            self.handles[i].finish()

    def _host_layers(self, l: int) -> list[torch.Tensor]:
        """Layer ``l`` of the chunks copied to the device, as they are on the host."""
        return [self.handles[i].layer(l) for i in self._copy]

    def _loader(self) -> None:
        with torch.inference_mode(self._inference):
            self._load_layers()

    def _load_layers(self) -> None:
        try:
            for l in range(self.num_layers):
                if self._closed:
                    return
                if self._streamed:
                    self._read_layer(l)
                if self._staging is not None:
                    with self._cond:  # the slot's previous layer must have been handed out
                        while self._consumer_at < l - self.depth and not self._closed:
                            self._cond.wait()
                        if self._closed:
                            return
                    self._times.copy_events[l] = self._staging.issue_copy(l, self._host_layers(l))
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

        Raises :class:`ChunkCorruptError` if a stored chunk fails its checksum or MAC (the
        file or value has been removed) and :class:`ChunkUnavailableError` if a remote
        chunk cannot be read to the end: retry the request with that chunk treated as
        uncached."""
        if not 0 <= l < self.num_layers:
            raise IndexError(f"layer {l} out of range [0, {self.num_layers})")
        cur = torch.cuda.current_stream(self.device) if self.cuda else None
        t0 = time.perf_counter()
        if self.pipelined:
            with self._cond:
                if self._staging is not None:
                    self._staging.consumer_reached(l, cur)
                self._consumer_at = max(self._consumer_at, l)
                self._cond.notify_all()
                while not self._loaded[l] and not (self._error is not None and self._error_layer <= l):
                    self._cond.wait()
                if not self._loaded[l]:
                    raise self._error
            self._times.host_wait_ms[l] = (time.perf_counter() - t0) * 1e3
            if self._staging is not None:
                self._times.stall_events[l] = self._staging.wait_ready(l, cur)
        else:
            self._load_sync(l, cur)
        return self._layer_tensors(l)

    def _load_sync(self, l: int, cur) -> None:
        if self._streamed:
            self._read_layer(l)
            if l == self.num_layers - 1:
                self._finish_streamed()
        if self._staging is not None:
            cur.synchronize()  # the previous layer's work is done: the single slot is free
            t0 = time.perf_counter()
            for buf, src in zip(self._staging.buffers(l), self._host_layers(l)):
                buf.copy_(src)
            cur.synchronize()
            self._times.sync_copy_ms[l] = (time.perf_counter() - t0) * 1e3
        self._loaded[l] = True

    def _layer_tensors(self, l: int) -> list[torch.Tensor]:
        out: list = [None] * len(self.handles)
        for i in self._direct:
            out[i] = self.handles[i].layer(l).to(self.device)
        if self._staging is not None:
            for i, buf in zip(self._copy, self._staging.buffers(l)):
                out[i] = buf
        else:
            for i in self._streamed:
                out[i] = self.handles[i].layer(l)
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
        if self._staging is not None:
            self._staging.release()
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
        L, times = self.num_layers, self._times
        load = list(times.read_ms)
        exposed = list(times.host_wait_ms) if self.pipelined else list(times.read_ms)
        for l in range(L):
            if times.copy_events[l] is not None:
                s, e = times.copy_events[l]
                e.synchronize()
                load[l] += s.elapsed_time(e)
            if times.stall_events[l] is not None:
                b, a = times.stall_events[l]
                a.synchronize()
                exposed[l] += b.elapsed_time(a)
            if not self.pipelined:
                load[l] += times.sync_copy_ms[l]
                exposed[l] += times.sync_copy_ms[l]
        load_ms, exposed_ms = sum(load), sum(exposed)
        hidden = max(0.0, load_ms - exposed_ms)
        tiers: dict = {}
        for h in self.handles:
            tiers[h.tier] = tiers.get(h.tier, 0) + 1
        consumed = sum(1 for ok in self._loaded if ok)
        tier_bytes = {t: sum(self.handles[i].layer_nbytes for i in idx) * consumed
                      for t, idx in (("disk", self._disk), ("remote", self._remote)) if idx}
        tier_ms = {t: sum(times.tier_ms[t]) for t in tier_bytes}
        return LoadReport(
            mode="pipelined" if self.pipelined else "sync", device=str(self.device), num_layers=L,
            num_chunks=len(self.handles), tiers=tiers, bytes_loaded=self._bytes_per_layer * L,
            load_ms=load_ms, exposed_ms=min(exposed_ms, load_ms),  # waits can only expose actual loading
            hidden_ms=hidden, hidden_fraction=(hidden / load_ms) if load_ms > 0 else 1.0,
            load_ms_per_layer=load, exposed_ms_per_layer=exposed, tier_load_ms=tier_ms, tier_bytes=tier_bytes,
        )


def open_layer_source(store: ChunkStore, keys: Sequence[str], device, *, scope, pipelined: bool = True,
                      depth: int = 1) -> tuple[StoreLayerSource, list[int]]:
    """Open ``keys`` of ``scope`` (one scope, or one per key) in ``store`` and build a layer
    source over the ones found.

    Returns ``(source, missing)`` where ``missing`` lists the indices of ``keys`` that were
    not in the store (or were corrupt or forged); the source's chunks are the remaining
    keys, in order.
    """
    opened = store.open_many(keys, scope=scope)
    handles = [h for h in opened if h is not None]
    missing = [i for i, h in enumerate(opened) if h is None]
    return StoreLayerSource(handles, device, pipelined=pipelined, depth=depth), missing


__all__ = ["ChunkCorruptError", "ChunkLoadError", "LoadReport", "StoreLayerSource", "open_layer_source"]
