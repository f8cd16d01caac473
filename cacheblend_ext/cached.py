"""The blend engine on top of the chunk store: look chunks up by content, encode and
store them on a miss, and stream their KV layer by layer from the store while the engine
recomputes.

    blender = CachedBlender(engine, disk_dir="~/.cache/cacheblend/kv")
    result, report = blender.blend(prefix, [passage_1, passage_2, ...], query)
    # result: the engine's BlendResult; report: LoadReport (load time, hidden fraction)

Chunks may come in any subset and order. A chunk whose file or remote value turns out to
be corrupt or unreadable while it is being streamed is re-encoded, stored again and the
request retried with the fresh KV, so the caller never sees the store's failures.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .layer_source import LoadReport
from .store.pipeline import StoreLayerSource
from .store import ChunkHandle, ChunkLoadError, ChunkStore, StoredChunk


def _stub_chunk(handle, dtype, device):
    """A ``ChunkKV`` describing a stored chunk without its KV (the layer source supplies it)."""
    from .chunk import ChunkKV

    kv = torch.empty((), dtype=dtype, device=device).expand(*handle.shape)  # no memory
    prefix = tuple(int(t) for t in handle.meta.get("prefix_ids", ()))
    return ChunkKV(kv, handle.positions, handle.token_ids, handle.key, prefix)


def _check_not_empty(engine, chunks) -> None:
    for i, c in enumerate(chunks):
        if engine.tokenize(c).numel() == 0:
            raise ValueError(f"chunks[{i}] is empty: a chunk needs at least one token")


class CachedBlender:
    """A :class:`cacheblend_ext.blend.engine.BlendEngine` whose chunks live in a :class:`ChunkStore`.

    Args:
        engine: the blend engine.
        store: a store to use (it must have the engine's identity); by default one is
            created with the engine's model and RoPE identity, ``disk_dir``, the byte
            budgets and ``remote`` / ``remote_write`` (see :class:`ChunkStore`).
        pipelined: load layer ``l + 1`` while layer ``l`` is recomputed (default) or load
            each layer on demand.
        depth: layers loaded ahead.
        controller: a :class:`cacheblend_ext.store.controller.LoadingController` that learns
            each tier's load throughput from every request (``observe``).
    """

    def __init__(self, engine, store: ChunkStore | None = None, *, disk_dir: str | os.PathLike | None = None,
                 gpu_bytes: int = 0, cpu_bytes: int = 2 << 30, disk_bytes: int | None = None, remote=None,
                 remote_write: str = "through", pipelined: bool = True, depth: int = 1, controller=None):
        self.engine = engine
        if store is None:
            store = ChunkStore(engine.identity.model_id, engine.identity.rope_id,
                               disk_dir=os.path.expanduser(disk_dir) if disk_dir is not None else None,
                               gpu_bytes=gpu_bytes, cpu_bytes=cpu_bytes, disk_bytes=disk_bytes,
                               device=engine.device if engine.device.type == "cuda" else None,
                               remote=remote, remote_write=remote_write)
        elif store.identity != engine.identity:
            raise ValueError(f"store holds KV of {store.identity}, the engine is {engine.identity}")
        self.store = store
        self.pipelined = pipelined
        self.depth = depth
        self.controller = controller

    def key(self, segment, prefix=None, config=None) -> str:
        """The content key of ``segment``'s chunk KV when it is used after ``prefix``."""
        e = self.engine
        return e.chunk_key(e.tokenize(segment), e.chunk_prefix_ids(e.chunk_context(prefix, config)))

    def add(self, segment, prefix=None, config=None) -> str:
        """Encode ``segment`` and store its KV (unless already stored) for requests that
        start with ``prefix``; returns its key."""
        key = self.key(segment, prefix, config)
        if self.store.where(key) is None:
            self._encode_and_put(segment, self.engine.chunk_context(prefix, config))
        return key

    def add_many(self, segments: Sequence, prefix=None, config=None, progress=None) -> list[str]:
        _check_not_empty(self.engine, segments)
        keys = []
        for i, s in enumerate(segments):
            keys.append(self.add(s, prefix, config))
            if progress is not None:
                progress(i + 1, len(segments))
        return keys

    def _encode_and_put(self, segment, context=None):
        chunk = self.engine.encode_chunk(segment, context)
        self.store.put(chunk.key, chunk.kv, chunk.positions, chunk.token_ids,
                       meta={"prefix_ids": [int(t) for t in chunk.prefix_ids]})
        return chunk

    def _encoded_handle(self, chunk) -> ChunkHandle:
        """A handle over KV encoded during this request (used as is, whatever the store kept)."""
        stored = StoredChunk(chunk.key, chunk.kv, chunk.positions, chunk.token_ids,
                             {"prefix_ids": [int(t) for t in chunk.prefix_ids]})
        return ChunkHandle(self.store, chunk.key, "encoded", chunk=stored)

    def blend(self, prefix, chunks: Sequence, query, config=None):
        """Blend ``prefix + chunks + query``; chunks are texts or token ids, reused via the store.

        ``prefix`` may be ``None``. Under ``chunk_prefix="prefix"`` chunks are encoded after
        ``prefix`` (and keyed by it). A chunk the store does not have is encoded and stored;
        a chunk that fails while it streams (corrupt, remote gone or evicted) is encoded
        again and the request recomputed, so a store failure never reaches the caller.
        Returns ``(BlendResult, LoadReport)``; the report is also in
        ``result.timings["load"]``.
        """
        e = self.engine
        _check_not_empty(e, chunks)
        context = e.chunk_context(prefix, config)
        keys = [self.key(c, prefix, config) for c in chunks]
        encoded: dict = {}  # key -> ChunkKV encoded during this request (a repeated chunk once)

        def encode(i):
            if keys[i] not in encoded:
                encoded[keys[i]] = self._encode_and_put(chunks[i], context)

        while True:  # each failed attempt encodes one more chunk, so this ends
            todo = [i for i in range(len(chunks)) if keys[i] not in encoded]
            handles = dict(zip(todo, self.store.open_many([keys[i] for i in todo])))
            for i in todo:
                if handles[i] is None:  # a miss: encode, store, use the fresh KV
                    encode(i)
            ordered = [self._encoded_handle(encoded[k]) if k in encoded else handles[i] for i, k in enumerate(keys)]
            source = StoreLayerSource(ordered, e.device, pipelined=self.pipelined, depth=self.depth)
            stubs = [_stub_chunk(h, e.dtype, e.device) for h in ordered]
            segments = ([prefix] if prefix is not None else []) + stubs + [query]
            try:
                result = e.blend(segments, config, source=source)
            except ChunkLoadError as exc:  # the store already dropped a corrupt copy
                if exc.key in encoded:  # cannot happen: encoded KV is in memory
                    raise
                encode(keys.index(exc.key))
                continue
            finally:
                source.close()
            report: LoadReport = source.report()
            result.timings["load"] = report.as_dict()
            if self.controller is not None:
                self.controller.observe(report)
            return result, report


__all__ = ["CachedBlender"]
