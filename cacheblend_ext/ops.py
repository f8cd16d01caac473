"""Typed Python wrappers and fake (meta) implementations of ``torch.ops.cacheblend.*``.

Conventions shared by every op:
- token-major layouts ``[num_tokens, num_heads, head_dim]``, last dim contiguous,
  other strides free;
- fp16 / bf16 / fp32 storage, fp32 math; positions and indices int32 or int64;
- in-place outputs are declared ``Tensor(a!)`` in the schema; CUDA kernels run on the
  current stream and never synchronise with the host.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _library  # noqa: F401  (registers torch.ops.cacheblend)

_ops = torch.ops.cacheblend


# ---------------------------------------------------------------------------
# RoPE re-positioning
# ---------------------------------------------------------------------------


def rope_reposition(
    key: torch.Tensor,
    src_pos: torch.Tensor,
    dst_pos: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate each token of ``key`` ``[T, H, D]`` from ``src_pos[t]`` to ``dst_pos[t]``.

    ``key`` holds keys already rotated at ``src_pos`` (as a model caches them); the
    result equals the same raw keys rotated at ``dst_pos``. ``cos_sin_cache`` is
    ``[max_pos, rotary_dim]`` float32 (see :mod:`cacheblend_ext.rope`); dims past
    ``rotary_dim`` pass through. Works in place on ``key`` unless ``out`` is given.
    Returns the rotated tensor (``key`` or ``out``).
    """
    if out is None:
        _ops.rope_reposition(key, src_pos, dst_pos, cos_sin_cache, is_neox)
        return key
    _ops.rope_reposition_out(key, src_pos, dst_pos, cos_sin_cache, is_neox, out=out)
    return out


@torch.library.register_fake("cacheblend::rope_reposition")
def _rope_reposition_fake(key, src_pos, dst_pos, cos_sin_cache, is_neox) -> None:
    return None


@torch.library.register_fake("cacheblend::rope_reposition_out")
def _rope_reposition_out_fake(key, src_pos, dst_pos, cos_sin_cache, is_neox, *, out) -> None:
    return None


# ---------------------------------------------------------------------------
# Sparse-query attention
# ---------------------------------------------------------------------------


def sparse_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float | None = None,
    *,
    q_indptr: torch.Tensor | None = None,
    kv_indptr: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of selected queries with the exact position-causal mask.

    ``q`` ``[M, Hq, D]`` holds queries at absolute positions ``q_pos`` ``[M]`` (int32 or
    int64, positions within their request); ``k``, ``v`` ``[N, Hkv, D]`` hold the
    request's keys and values, key ``j`` at position ``j``; ``Hq`` is a multiple of
    ``Hkv`` (grouped-query attention). Key ``j`` is visible to query ``i`` iff
    ``j <= q_pos[i]``. ``scale`` defaults to ``1 / sqrt(D)``.

    Ragged batches: ``q_indptr`` and ``kv_indptr`` ``[B + 1]`` (both or neither) give each
    request's rows of ``q`` / ``q_pos`` and of ``k`` / ``v``; ``None`` means one request.
    A request may have no queries.

    Returns ``out`` ``[M, Hq, D]`` in ``q``'s dtype (written into ``out`` when given) and,
    with ``return_lse``, also the natural-log log-sum-exp of the scaled scores
    ``[M, Hq]`` float32. Matches :func:`cacheblend_ext.reference.sparse_query_attention`.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    _ops.sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr, float(scale), out, lse)
    return (out, lse) if return_lse else out


@torch.library.register_fake("cacheblend::sparse_query_attention")
def _sparse_query_attention_fake(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse) -> None:
    return None
