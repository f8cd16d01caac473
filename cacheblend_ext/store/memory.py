"""The chunk store's memory tiers (GPU and CPU): the :class:`StoredChunk` they hold and a
least-recently-used map of them under a byte budget (:class:`MemoryTier`), addressed by
``(scope, key)``."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class StoredChunk:
    """A chunk's KV as held by the store.

    ``kv`` ``[L, 2, T, H, D]`` (K after RoPE, then V), ``positions`` int64 ``[T]`` on the
    CPU, ``token_ids`` int64 ``[T']`` on the CPU (may be empty), ``meta`` a JSON-able dict,
    ``scope`` (keyword only) the scope it is stored in.
    Tensors returned by :meth:`ChunkStore.get` are the store's own copies: read them, do
    not modify them in place.
    """

    key: str
    kv: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor
    meta: dict = field(default_factory=dict)
    scope: str = field(kw_only=True)

    @property
    def address(self) -> tuple[str, str]:
        """``(scope, key)``: where the store keeps it."""
        return self.scope, self.key

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def num_layers(self) -> int:
        return int(self.kv.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[2])


class MemoryTier:
    """LRU map (scope, key) -> StoredChunk under a byte budget (callers hold the store lock)."""

    def __init__(self, name: str, budget: int):
        self.name = name
        self.budget = int(budget)
        self.items: OrderedDict[tuple[str, str], StoredChunk] = OrderedDict()
        self.bytes = 0

    def get(self, address: tuple[str, str]) -> StoredChunk | None:
        item = self.items.get(address)
        if item is not None:
            self.items.move_to_end(address)
        return item

    def fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.budget

    def insert(self, item: StoredChunk) -> list[StoredChunk]:
        """Insert (or refresh) ``item``; returns the evicted items, oldest first."""
        old = self.items.pop(item.address, None)
        if old is not None:
            self.bytes -= old.nbytes
        self.items[item.address] = item
        self.bytes += item.nbytes
        evicted = []
        while self.bytes > self.budget and self.items:
            _, victim = self.items.popitem(last=False)
            self.bytes -= victim.nbytes
            evicted.append(victim)
        return evicted

    def clear(self, scope: str | None = None) -> None:
        """Drop every item (of ``scope`` only, when given)."""
        if scope is None:
            self.items.clear()
            self.bytes = 0
            return
        for address in [a for a in self.items if a[0] == scope]:
            self.remove(address)

    def remove(self, address: tuple[str, str]) -> StoredChunk | None:
        item = self.items.pop(address, None)
        if item is not None:
            self.bytes -= item.nbytes
        return item
