"""The one place where the engine picks each kernel: the compiled op when the extension
registers it (``torch.ops.cacheblend.<name>`` via :mod:`cacheblend_ext.ops`), otherwise
the float64 PyTorch reference of the same name in :mod:`cacheblend_ext.reference`
(slow, CPU, float64; results are cast back to the caller's dtype and device here).

:func:`backends` says which path each op takes, so benchmarks can print it. The
reference fallback exists only for ops that are not compiled into the extension yet.
"""

from __future__ import annotations

import torch

from . import ops, reference

_NAMES = ("fused_kv_concat", "kv_deviation", "select_hkvd", "sparse_query_attention")


def _has_op(name: str) -> bool:
    if not hasattr(ops, name):
        return False
    try:
        return hasattr(torch.ops.cacheblend, name)
    except Exception:  # pragma: no cover
        return False


def backends() -> dict[str, str]:
    """``{op name: "op" | "reference"}`` for the ops the engine uses."""
    return {n: ("op" if _has_op(n) else "reference") for n in _NAMES}


def fused_kv_concat(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, is_neox, k_caches, v_caches) -> None:
    """Gather chunk K/V (``[L, 2, T_i, H, D]``) into per-layer caches, re-rotating K."""
    if _has_op("fused_kv_concat"):
        ops.fused_kv_concat(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, is_neox, k_caches, v_caches)
    else:
        reference.fused_kv_concat(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, is_neox, k_caches, v_caches)


def kv_deviation(fresh, reused, token_index=None, *, out=None, accumulate=False) -> torch.Tensor:
    """Per-token squared deviation ``[M]`` float32 (see ``ops.kv_deviation``)."""
    if _has_op("kv_deviation"):
        return ops.kv_deviation(fresh, reused, token_index, out=out, accumulate=accumulate)
    dev = reference.kv_deviation(fresh, reused, token_index).to(device=fresh.device, dtype=torch.float32)
    if out is None:
        return dev
    if accumulate:
        out.add_(dev)
    else:
        out.copy_(dev)
    return out


def select_hkvd(deviation, k: int, forced=None, candidates=None) -> torch.Tensor:
    """Selected indices (int64, ascending) on ``deviation``'s device (see ``ops.select_hkvd``)."""
    if _has_op("select_hkvd"):
        return ops.select_hkvd(deviation, k, forced=forced, candidates=candidates)
    return reference.select_hkvd(deviation, k, forced, candidates).to(deviation.device)


def sparse_query_attention(q, k, v, q_pos, scale=None) -> torch.Tensor:
    """Exact position-causal attention of ``q [M, Hq, D]`` against ``k, v [N, Hkv, D]``."""
    if _has_op("sparse_query_attention"):
        return ops.sparse_query_attention(q, k, v, q_pos, scale)
    out, _ = reference.sparse_query_attention(q, k, v, q_pos, scale)
    return out.to(device=q.device, dtype=q.dtype)
