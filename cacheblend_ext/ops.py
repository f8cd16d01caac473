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
# Fused KV concatenation + RoPE re-positioning
# ---------------------------------------------------------------------------


def _per_layer(caches: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(caches, torch.Tensor):
        if caches.dim() not in (4, 5):
            raise ValueError(
                f"{name} as one tensor must be [L, num_slots, H, D] or [L, num_blocks, block_size, H, D], "
                f"got shape {tuple(caches.shape)}"
            )
        return list(caches.unbind(0))
    return list(caches)


def fused_kv_concat(
    chunks: Sequence[torch.Tensor],
    src_pos: torch.Tensor,
    dst_pos: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    k_caches: torch.Tensor | Sequence[torch.Tensor],
    v_caches: torch.Tensor | Sequence[torch.Tensor],
) -> None:
    """Gather the cached K/V of many chunks, for every layer, into a request's cache.

    How chunks are passed: ``chunks[i]`` is ``[L, 2, T_i, H, D]`` (K after RoPE at its
    cached positions, then V) with the last dim contiguous and other strides free, so
    slices or views of a store buffer are read in place, never copied first. Token ``t``
    of their concatenation (chunk 0's tokens, then chunk 1's, ...) is written to slot
    ``slot_mapping[t]`` of every layer (``-1`` skips it), with its K re-rotated from
    ``src_pos[t]`` to ``dst_pos[t]``. ``src_pos``, ``dst_pos`` and ``slot_mapping`` are
    ``[sum T_i]`` of one integer dtype.

    Destinations: ``k_caches`` / ``v_caches`` are either one tensor ``[L, num_slots, H, D]``
    (contiguous request KV, slot = row) or ``[L, num_blocks, block_size, H, D]`` (paged),
    or lists of L per-layer tensors ``[num_slots, H, D]`` / ``[num_blocks, block_size, H, D]``
    (as vLLM keeps them). Each destination element is written once, in one launch for up
    to 32 chunks x 64 layers. Slots must be unique (checked on the CPU; on CUDA it is the
    caller's contract, like vLLM's ``reshape_and_cache``).
    """
    _ops.fused_kv_concat(
        list(chunks),
        src_pos,
        dst_pos,
        slot_mapping,
        cos_sin_cache,
        is_neox,
        _per_layer(k_caches, "k_caches"),
        _per_layer(v_caches, "v_caches"),
    )


@torch.library.register_fake("cacheblend::fused_kv_concat")
def _fused_kv_concat_fake(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, is_neox, k_caches, v_caches) -> None:
    return None
