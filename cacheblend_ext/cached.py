"""The blend engine on top of the chunk store: look chunks up by content, encode and
store them on a miss, and stream their KV layer by layer from the store while the engine
recomputes.

    blender = CachedBlender(engine, disk_dir="~/.cache/cacheblend/kv")
    result, report = blender.blend(prefix, [passage_1, passage_2, ...], query, scope="tenant-42")
    # result: the engine's BlendResult; report: LoadReport (load time, hidden fraction)

Every chunk is stored and looked up in a *scope* (a tenant, a user, or ``"public"`` for
a corpus every requester may see; see :func:`cacheblend_ext.identity.check_scope`): a
request reuses only chunks of the scopes it names, so one tenant's request can neither
hit nor time another tenant's documents. ``scope=`` has no default; pass one scope for
all chunks of a request, or one per chunk (``["tenant-42", "public", ...]``) to mix a
tenant's documents with a shared corpus.

Chunks may come in any subset and order. A chunk whose file or remote value turns out to
be corrupt or unreadable while it is being streamed is re-encoded, stored again and the
request retried with the fresh KV, so the caller never sees the store's failures.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .identity import check_scope, scope_list
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
        if engine.tokenize(c, f"chunks[{i}]").numel() == 0:
            raise ValueError(f"chunks[{i}] is empty: a chunk needs at least one token")


class CachedBlender:
    """A :class:`cacheblend_ext.blend.engine.BlendEngine` whose chunks live in a :class:`ChunkStore`.

    Args:
        engine: the blend engine.
        store: a store to use (it must have the engine's identity); by default one is
            created with the engine's model and RoPE identity, ``disk_dir``, the byte
            budgets, ``remote`` / ``remote_write`` and ``mac_key`` (see :class:`ChunkStore`).
        pipelined: load layer ``l + 1`` while layer ``l`` is recomputed (default) or load
            each layer on demand.
        depth: layers loaded ahead.
        controller: a :class:`cacheblend_ext.store.controller.LoadingController` that learns
            each tier's load throughput from every request (``observe``).
    """

    def __init__(self, engine, store: ChunkStore | None = None, *, disk_dir: str | os.PathLike | None = None,
                 gpu_bytes: int = 0, cpu_bytes: int = 2 << 30, disk_bytes: int | None = None, remote=None,
                 remote_write: str = "through", mac_key: bytes | None = None, pipelined: bool = True,
                 depth: int = 1, controller=None):
        self.engine = engine
        if store is None:
            store = ChunkStore(engine.identity.model_id, engine.identity.rope_id,
                               disk_dir=os.path.expanduser(disk_dir) if disk_dir is not None else None,
                               gpu_bytes=gpu_bytes, cpu_bytes=cpu_bytes, disk_bytes=disk_bytes,
                               device=engine.device if engine.device.type == "cuda" else None,
                               remote=remote, remote_write=remote_write, mac_key=mac_key)
        elif mac_key is not None:
            raise ValueError("mac_key configures the store CachedBlender makes; pass it to your ChunkStore instead")
        elif store.identity != engine.identity:
            raise ValueError(f"store holds KV of {store.identity}, the engine is {engine.identity}")
        self.store = store
        self.pipelined = pipelined
        self.depth = depth
        self.controller = controller

    def key(self, segment, prefix=None, config=None) -> str:
        """The content key of ``segment``'s chunk KV when it is used after ``prefix`` (the
        same in every scope; the store keeps each scope's copy apart)."""
        e = self.engine
        return e.chunk_key(e.tokenize(segment), e.chunk_prefix_ids(e.chunk_context(prefix, config)))

    def add(self, segment, prefix=None, config=None, *, scope: str) -> str:
        """Encode ``segment`` and store its KV in ``scope`` (unless already stored there) for
        requests that start with ``prefix``; returns its key."""
        check_scope(scope)
        key = self.key(segment, prefix, config)
        if self.store.where(key, scope=scope) is None:
            self._encode_and_put(segment, self.engine.chunk_context(prefix, config), scope)
        return key

    def add_many(self, segments: Sequence, prefix=None, config=None, progress=None, *, scope: str) -> list[str]:
        """:meth:`add` for each of ``segments`` (e.g. a public corpus, ahead of requests:
        then a public lookup is a hit whoever asked before, and its timing tells nothing)."""
        check_scope(scope)
        _check_not_empty(self.engine, segments)
        keys = []
        for i, s in enumerate(segments):
            keys.append(self.add(s, prefix, config, scope=scope))
            if progress is not None:
                progress(i + 1, len(segments))
        return keys

    def _encode_and_put(self, segment, context, scope: str):
        chunk = self.engine.encode_chunk(segment, context)
        self.store.put(chunk.key, chunk.kv, chunk.positions, chunk.token_ids,
                       meta={"prefix_ids": [int(t) for t in chunk.prefix_ids]}, scope=scope)
        return chunk

    def _encoded_handle(self, chunk, scope: str) -> ChunkHandle:
        """A handle over KV encoded during this request (used as is, whatever the store kept)."""
        stored = StoredChunk(chunk.key, chunk.kv, chunk.positions, chunk.token_ids,
                             {"prefix_ids": [int(t) for t in chunk.prefix_ids]}, scope=scope)
        return ChunkHandle(self.store, scope, chunk.key, "encoded", chunk=stored)

    def blend(self, prefix, chunks: Sequence, query, config=None, *, scope):
        """Blend ``prefix + chunks + query``; chunks are texts or token ids, reused via the store.

        ``scope``: the scope all chunks are looked up and stored in, or a sequence of one
        scope per chunk. ``prefix`` may be ``None``. Under ``chunk_prefix="prefix"`` chunks
        are encoded after ``prefix`` (and keyed by it). A chunk the store does not have in
        its scope is encoded and stored there; a chunk that fails while it streams
        (corrupt, forged, remote gone or evicted) is encoded again and the request
        recomputed, so a store failure never reaches the caller. Returns
        ``(BlendResult, LoadReport)``; the report is also in ``result.timings["load"]``.
        """
        e = self.engine
        chunks = e.segment_list(chunks, "chunks")
        scopes = scope_list(scope, len(chunks), "chunk")
        _check_not_empty(e, chunks)
        context = e.chunk_context(prefix, config)
        addresses = [(s, self.key(c, prefix, config)) for s, c in zip(scopes, chunks)]
        encoded: dict = {}  # (scope, key) -> ChunkKV encoded during this request (a repeated chunk once)

        def encode(i):
            if addresses[i] not in encoded:
                encoded[addresses[i]] = self._encode_and_put(chunks[i], context, scopes[i])

        while True:  # each failed attempt encodes one more chunk, so this ends
            todo = [i for i in range(len(chunks)) if addresses[i] not in encoded]
            opened = self.store.open_many([addresses[i][1] for i in todo], scope=[scopes[i] for i in todo])
            handles = dict(zip(todo, opened))
            for i in todo:
                if handles[i] is None:  # a miss: encode, store, use the fresh KV
                    encode(i)
            ordered = [self._encoded_handle(encoded[a], a[0]) if a in encoded else handles[i]
                       for i, a in enumerate(addresses)]
            source = StoreLayerSource(ordered, e.device, pipelined=self.pipelined, depth=self.depth)
            stubs = [_stub_chunk(h, e.dtype, e.device) for h in ordered]
            segments = ([prefix] if prefix is not None else []) + stubs + [query]
            try:
                result = e.blend(segments, config, source=source)
            except ChunkLoadError as exc:  # the store already dropped a corrupt copy
                failed = (exc.scope, exc.key)
                if failed in encoded:  # cannot happen: encoded KV is in memory
                    raise
                encode(addresses.index(failed))
                continue
            finally:
                source.close()
            report: LoadReport = source.report()
            result.timings["load"] = report.as_dict()
            if self.controller is not None:
                self.controller.observe(report)
            return result, report


__all__ = ["CachedBlender"]
