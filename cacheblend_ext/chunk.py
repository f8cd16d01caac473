"""The reusable KV of one text chunk.

A :class:`ChunkKV` holds what a chunk contributes to any request it appears in:
``kv`` ``[L, 2, T, H_kv, D]`` (per layer, K *after* RoPE at ``positions``, then V), the
``positions`` ``[T]`` it was computed at, its ``token_ids`` ``[T]``, the ids of the
context it was encoded after (``prefix_ids``, whose KV was dropped) and a content
``key``: :func:`cacheblend_ext.identity.chunk_key` of the model identity, the RoPE
configuration, the storage dtype, the prefix ids and the token ids, so equal keys mean
interchangeable KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChunkKV:
    kv: torch.Tensor  # [L, 2, T, H_kv, D]
    positions: torch.Tensor  # [T] int64: where K was rotated
    token_ids: torch.Tensor  # [T] int64
    key: str
    prefix_ids: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise ValueError(f"ChunkKV.kv must be [L, 2, T, H, D], got {tuple(self.kv.shape)}")
        t = self.kv.shape[2]
        if self.positions.shape != (t,) or self.token_ids.shape != (t,):
            raise ValueError(
                f"positions {tuple(self.positions.shape)} and token_ids {tuple(self.token_ids.shape)} "
                f"must both be [{t}]"
            )

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[2])

    @property
    def num_layers(self) -> int:
        return int(self.kv.shape[0])

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, layer: int) -> torch.Tensor:
        """``[2, T, H, D]`` of one layer (a view)."""
        return self.kv[layer]

    def to(self, device=None, dtype=None) -> "ChunkKV":
        return ChunkKV(self.kv.to(device=device, dtype=dtype), self.positions.to(device), self.token_ids,
                       self.key, self.prefix_ids)

    def __len__(self) -> int:
        return self.num_tokens
