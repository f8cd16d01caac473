"""Plain-PyTorch reference implementations of every op, in float64 by default.

They define the ops' semantics: tests compare the kernels against them, and they are
written for clarity, not speed.
"""

from __future__ import annotations

import torch


def rope_rotate(x: torch.Tensor, pos: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Apply RoPE at ``pos`` to raw ``x`` ``[T, H, D]`` (float64 result)."""
    x = x.to(torch.float64)
    table = cos_sin_cache.to(torch.float64)[pos.long()]  # [T, rotary_dim]
    rotary_dim = table.shape[1]
    half = rotary_dim // 2
    cos, sin = table[:, None, :half], table[:, None, half:]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        a, b = rot[..., :half], rot[..., half:]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


def rope_reposition(
    key: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool
) -> torch.Tensor:
    """Re-rotate keys cached at ``src_pos`` to ``dst_pos`` (float64 result).

    Rotation by ``dst - src`` is composed from table rows: R(dst) R(src)^-1, with the
    scheme's attention factor cancelled by normalising with the src row's norm.
    """
    table = cos_sin_cache.to(torch.float64)
    half = table.shape[1] // 2
    s, d = table[src_pos.long()], table[dst_pos.long()]
    cs, ss, cd, sd = s[:, :half], s[:, half:], d[:, :half], d[:, half:]
    norm = cs * cs + ss * ss
    delta = torch.cat([(cd * cs + sd * ss) / norm, (sd * cs - cd * ss) / norm], dim=-1)
    zero = torch.zeros(key.shape[0], dtype=torch.long, device=key.device)
    # Rotating by the delta table at "position" t picks row t of `delta`.
    return rope_rotate(key, torch.arange(key.shape[0], device=key.device) + zero, delta, is_neox)
