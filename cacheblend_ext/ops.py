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
