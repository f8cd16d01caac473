"""The blend engine on top of the chunk store: look chunks up by content, encode and
store them on a miss, and stream their KV layer by layer from the store while the engine
recomputes.

    blender = CachedBlender(engine, disk_dir="~/.cache/cacheblend/kv")
    result, report = blender.blend(prefix, [passage_1, passage_2, ...], query)
    # result: the engine's BlendResult; report: LoadReport (load time, hidden fraction)

Chunks may come in any subset and order. A chunk whose file turns out to be corrupt
while it is being streamed is re-encoded, stored again and the request retried, so the
caller never sees the store's failures.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from .pipeline import LoadReport, open_layer_source
from .store import ChunkCorruptError, ChunkStore, _hash_hex


def _stub_chunk(handle, dtype, device):
    """A ``ChunkKV`` describing a stored chunk without its KV (the layer source supplies it)."""
    from .chunk import ChunkKV

    kv = torch.empty((), dtype=dtype, device=device).expand(*handle.shape)  # no memory
    prefix = tuple(int(t) for t in handle.meta.get("prefix_ids", ()))
    return ChunkKV(kv, handle.positions, handle.token_ids, handle.key, prefix)


class CachedBlender:
    """A :class:`cacheblend_ext.engine.BlendEngine` whose chunks live in a :class:`ChunkStore`.

    Args:
        engine: the blend engine.
        store: a store to use; by default one is created with the engine's model and RoPE
            identity, ``disk_dir`` and the byte budgets.
        pipelined: load layer ``l + 1`` while layer ``l`` is recomputed (default) or load
            each layer on demand.
        depth: layers loaded ahead.
    """

    def __init__(self, engine, store: ChunkStore | None = None, *, disk_dir: str | os.PathLike | None = None,
                 gpu_bytes: int = 0, cpu_bytes: int = 2 << 30, disk_bytes: int | None = None,
                 pipelined: bool = True, depth: int = 1):
        self.engine = engine
        if store is None:
            rope_desc = json.dumps(engine._rope_desc(), sort_keys=True, default=str)
            store = ChunkStore("m-" + _hash_hex([engine.model_id.encode()], 12),
                               "r-" + _hash_hex([rope_desc.encode()], 12),
                               disk_dir=os.path.expanduser(disk_dir) if disk_dir is not None else None,
                               gpu_bytes=gpu_bytes, cpu_bytes=cpu_bytes, disk_bytes=disk_bytes,
                               device=engine.device if engine.device.type == "cuda" else None)
        self.store = store
        self.pipelined = pipelined
        self.depth = depth

    def key(self, segment) -> str:
        """The content key the engine gives ``segment``'s chunk KV."""
        from .chunk import chunk_key

        e = self.engine
        ids = e.tokenize(segment)
        prefix = e._bos() if e.config.chunk_prefix == "bos" else []
        return chunk_key(e.model_id, e._rope_desc(), e.dtype, ids, prefix)

    def add(self, segment) -> str:
        """Encode ``segment`` and store its KV (unless already stored); returns its key."""
        key = self.key(segment)
        if self.store.where(key) is None:
            self._encode_and_put(segment)
        return key

    def add_many(self, segments: Sequence, progress=None) -> list[str]:
        keys = []
        for i, s in enumerate(segments):
            keys.append(self.add(s))
            if progress is not None:
                progress(i + 1, len(segments))
        return keys

    def _encode_and_put(self, segment) -> str:
        chunk = self.engine.encode_chunk(segment)
        return self.store.put(chunk.key, chunk.kv, chunk.positions, chunk.token_ids,
                              meta={"prefix_ids": [int(t) for t in chunk.prefix_ids]})

    def blend(self, prefix, chunks: Sequence, query, config=None, max_retries: int = 3):
        """Blend ``prefix + chunks + query``; chunks are texts or token ids, reused via the store.

        ``prefix`` may be ``None``. Returns ``(BlendResult, LoadReport)``; the report is also
        in ``result.timings["load"]``.
        """
        e = self.engine
        keys = [self.add(c) for c in chunks]
        for attempt in range(max_retries + 1):
            source, missing = open_layer_source(self.store, keys, e.device, pipelined=self.pipelined,
                                                depth=self.depth)
            if missing:  # evicted or found corrupt since add(): encode again
                source.close()
                for i in missing:
                    self._encode_and_put(chunks[i])
                continue
            stubs = [_stub_chunk(h, e.dtype, e.device) for h in source.handles]
            segments = ([prefix] if prefix is not None else []) + stubs + [query]
            try:
                result = e.blend(segments, config, source=source)
            except ChunkCorruptError as exc:  # the store removed the file
                source.close()
                if attempt == max_retries:
                    raise
                self._encode_and_put(chunks[keys.index(exc.key)])
                continue
            finally:
                source.close()
            report: LoadReport = source.report()
            result.timings["load"] = report.as_dict()
            return result, report
        raise RuntimeError("could not load the request's chunks from the store")  # pragma: no cover


__all__ = ["CachedBlender"]
