"""Hugging Face compatibility: which models the engine runs, and the transformers details
it depends on (the cache argument's name, ``DynamicCache`` internals, the NeoX RoPE of the
attention modules), in one place."""

from __future__ import annotations

from typing import Sequence

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_model(model) -> None:
    """Refuse a model the engine cannot run: another architecture, modules it lacks, or
    layers that are not full attention."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {mtype!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    base = getattr(model, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, n)]
    if not hasattr(model, "lm_head"):
        missing.append("lm_head")
    if base is not None and hasattr(base, "layers") and len(base.layers):
        layer = base.layers[0]
        missing += [f"layers[0].{n}" for n in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
                    if not hasattr(layer, n)]
        attn = getattr(layer, "self_attn", None)
        missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, n)]
    if missing:
        raise ValueError(f"{type(model).__name__} lacks the modules the blend engine needs: {', '.join(missing)}")
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"only full-attention layers are supported, got layer_types {sorted(set(layer_types))}")


def cache_kwarg(model) -> str:
    """The name of the cache argument of ``model.forward`` (``cache`` in newer transformers)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def make_dynamic_cache(model, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    """A ``DynamicCache`` whose layer ``l`` holds ``keys[l]`` / ``values[l]``
    (``[1, H_kv, N, D]``) without copying them (transformers 5.17 to 5.24)."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older signature
        cache = DynamicCache()
    for l, (k, v) in enumerate(zip(keys, values)):
        if l < len(cache.layers):
            layer = cache.layers[l]
            if not getattr(layer, "is_initialized", False):
                layer.update(k[..., :0, :], v[..., :0, :])  # initialise (device, dtype) without copying
            layer.keys, layer.values = k, v
        else:
            cache.update(k, v, l)
    return cache


def out_cache(out):
    """The cache a forward returned, whichever name it has."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's NeoX RoPE on ``x [M, H, D]`` with ``cos``/``sin`` ``[M, rotary_dim]``."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot, rest = (x, None) if rd == x.shape[-1] else (x[..., :rd], x[..., rd:])
    half = rd // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated_half * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


def cache_layers(cache) -> list:
    """``[(keys, values)]`` per layer of a ``DynamicCache`` (``[1, H_kv, N, D]`` each)."""
    return [(layer.keys, layer.values) for layer in cache.layers]
