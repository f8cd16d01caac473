"""RoPE tables in the vLLM / FlashInfer layout, built from a Hugging Face config.

``cos_sin_cache`` is ``[max_position, rotary_dim]`` float32: row ``p`` holds
``cos(p * inv_freq)`` then ``sin(p * inv_freq)`` (``rotary_dim / 2`` each), both
multiplied by the scheme's attention factor (YaRN's ``mscale``; 1 elsewhere). The
inverse frequencies come from Hugging Face's own RoPE initialisers, so every scaling
type that transformers supports (default, linear, dynamic at its base length, llama3,
yarn, longrope's short factors) gives the table the model itself uses. The inverse
frequencies are Hugging Face's float32 values; the angles ``p * inv_freq`` are then
computed in float64 and rounded once (Hugging Face rounds them to float32, off by about
1e-3 rad at 32k positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    """What a cached K needs to be re-rotated: the table and the pair layout."""

    cos_sin_cache: torch.Tensor  # [max_position, rotary_dim] float32
    is_neox: bool  # True: half-split pairs (Llama, Mistral, Qwen); False: interleaved (GPT-J)
    rope_type: str
    attention_factor: float

    @property
    def rotary_dim(self) -> int:
        return int(self.cos_sin_cache.shape[1])

    @property
    def max_position(self) -> int:
        return int(self.cos_sin_cache.shape[0])


def rope_parameters(config) -> dict:
    """The RoPE parameters of a Hugging Face config (``rope_type``, ``rope_theta``, scaling),
    from ``rope_parameters`` or, before transformers 5, ``rope_theta`` + ``rope_scaling``."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers < 5: rope_theta + rope_scaling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return dict(params)


def inv_freq_from_config(config) -> tuple[torch.Tensor, float, str]:
    """Inverse frequencies (float64, CPU), attention factor and rope type of ``config``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        base = float(params["rope_theta"])
        # float32 like Hugging Face computes it: the frequencies the model was run with.
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq.to(torch.float64), 1.0, rope_type
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported by this transformers version "
            f"(known: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))})"
        )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.to(torch.float64), float(attention_factor), rope_type


def build_cos_sin_cache(
    inv_freq: torch.Tensor, max_position: int, attention_factor: float = 1.0, device=None
) -> torch.Tensor:
    """``[max_position, 2 * len(inv_freq)]`` float32 table, angles in float64."""
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    positions = torch.arange(max_position, dtype=torch.float64)
    angles = positions[:, None] * inv_freq.to(torch.float64)[None, :]
    table = torch.cat([angles.cos(), angles.sin()], dim=-1) * attention_factor
    return table.to(device=device, dtype=torch.float32).contiguous()


def rope_spec_from_config(config, max_position: int | None = None, device=None, is_neox: bool = True) -> RopeSpec:
    """The RoPE table a Hugging Face model with ``config`` uses.

    ``max_position`` defaults to ``config.max_position_embeddings``. Llama-family models
    use the NeoX (half-split) pair layout; pass ``is_neox=False`` for GPT-J style.
    """
    inv_freq, attention_factor, rope_type = inv_freq_from_config(config)
    if max_position is None:
        max_position = int(config.max_position_embeddings)
    table = build_cos_sin_cache(inv_freq, max_position, attention_factor, device)
    return RopeSpec(table, is_neox, rope_type, attention_factor)


def cos_sin_cache_from_config(config, max_position: int | None = None, device=None) -> torch.Tensor:
    """Shorthand for ``rope_spec_from_config(...).cos_sin_cache``."""
    return rope_spec_from_config(config, max_position, device).cos_sin_cache
