"""How reused chunk KV reaches the blend engine: one layer at a time, from a *layer source*.

Layer-source protocol
---------------------
The engine fetches the reused chunks' KV through a layer source, so a chunk store or a
pipelined loader can feed it while it computes::

    class LayerSource(Protocol):
        def layer(self, l: int) -> Sequence[torch.Tensor]: ...

``layer(l)`` is called exactly once per layer, in ascending order ``0..L-1``, right before
the engine needs layer ``l``, and returns one ``[2, T_i, H_kv, D]`` tensor (K after RoPE at
the chunk's cached positions, then V; last dim contiguous, other strides free) per reused
chunk, in the order the chunks appear in the request, on the engine's device and in the
model's dtype. A loader may start fetching layer ``l + 1`` when ``layer(l)`` is called; the
tensors returned for layer ``l`` must stay valid until ``layer(l + 1)`` is called (they may
live in a reused staging buffer; on CUDA they are produced on, or synchronised with, the
current stream). The engine may ignore the layers it recomputes fully.

Optional members: ``close()``, called when the blend ends; ``positions``, the positions
each chunk was encoded at; ``report()``, a :class:`LoadReport` of the loading.

:class:`MemoryLayerSource` serves KV already in memory (the engine's default, over the
request's ``ChunkKV`` objects); :class:`cacheblend_ext.store.pipeline.StoreLayerSource`
loads it from the chunk store behind the recompute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import torch


class LayerSource(Protocol):
    def layer(self, l: int) -> Sequence[torch.Tensor]: ...


@dataclass
class LoadReport:
    """Per-request loading statistics (milliseconds)."""

    mode: str
    device: str
    num_layers: int
    num_chunks: int
    tiers: dict
    bytes_loaded: int
    load_ms: float
    exposed_ms: float
    hidden_ms: float
    hidden_fraction: float
    load_ms_per_layer: list = field(default_factory=list)
    exposed_ms_per_layer: list = field(default_factory=list)
    tier_load_ms: dict = field(default_factory=dict)  # reads per tier ("disk", "remote"), ms
    tier_bytes: dict = field(default_factory=dict)  # bytes read per tier

    def as_dict(self) -> dict:
        return asdict(self)


class MemoryLayerSource:
    """Layer source over chunk KV already in memory (``kv`` ``[L, 2, T_i, H, D]`` each).

    Each layer is moved to ``device`` and cast to ``dtype`` when it is asked for (``None``:
    as it is, no copy).
    """

    def __init__(self, kvs: Sequence[torch.Tensor], positions: Sequence[torch.Tensor] | None = None, *,
                 device=None, dtype: torch.dtype | None = None):
        self.kvs = list(kvs)
        self.positions = list(positions) if positions is not None else [None] * len(self.kvs)
        self.num_layers = int(self.kvs[0].shape[0]) if self.kvs else 0
        self.device = device
        self.dtype = dtype

    @classmethod
    def of_chunks(cls, chunks: Sequence, device=None, dtype: torch.dtype | None = None) -> "MemoryLayerSource":
        """The source over :class:`~cacheblend_ext.chunk.ChunkKV` objects' own tensors."""
        chunks = list(chunks)
        return cls([c.kv for c in chunks], [c.positions for c in chunks], device=device, dtype=dtype)

    def layer(self, l: int) -> list[torch.Tensor]:
        return [kv[l].to(device=self.device, dtype=self.dtype, non_blocking=True) for kv in self.kvs]

    def close(self) -> None:
        pass

    def report(self) -> LoadReport:
        return LoadReport("memory", "", self.num_layers, len(self.kvs), {"memory": len(self.kvs)}, 0,
                          0.0, 0.0, 0.0, 1.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def InMemorySource(chunks: Sequence, device=None, dtype: torch.dtype | None = None) -> MemoryLayerSource:  # noqa: N802
    """:meth:`MemoryLayerSource.of_chunks` under the name the engine's source had before the
    two in-memory sources became one (kept for callers)."""
    return MemoryLayerSource.of_chunks(chunks, device, dtype)


__all__ = ["InMemorySource", "LayerSource", "LoadReport", "MemoryLayerSource"]
