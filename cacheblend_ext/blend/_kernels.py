"""The ops the engine calls, by the names it uses: aliases of :mod:`cacheblend_ext.ops`.

The compiled ops are always registered (importing :mod:`cacheblend_ext` loads them), so
there is no other path; :func:`backends` says so for benchmark records.
"""

from __future__ import annotations

from ..ops import fused_kv_concat, kv_deviation, select_hkvd, sparse_query_attention

__all__ = ["backends", "fused_kv_concat", "kv_deviation", "select_hkvd", "sparse_query_attention"]

_NAMES = ("fused_kv_concat", "kv_deviation", "select_hkvd", "sparse_query_attention")


def backends() -> dict[str, str]:
    """``{op name: "op"}`` for the ops the engine uses: each is ``torch.ops.cacheblend.<name>``."""
    return {n: "op" for n in _NAMES}
