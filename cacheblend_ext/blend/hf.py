"""Hugging Face compatibility: which models the engine runs, how it drives their modules
(:class:`HFDecoder`), and the transformers details it depends on (the cache argument's
name, ``DynamicCache`` internals, the NeoX RoPE of the attention modules), in one place."""

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
    (``[1, H_kv, N, D]``) without copying them (transformers >=5.17,<5.26)."""
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


class HFDecoder:
    """A Hugging Face decoder as the blend runs it: a request's embeddings and RoPE angles,
    each layer's Q/K/V of any rows, the output projection and MLP after attention, and the
    logits of a last hidden state. Several requests' rows share one call per projection
    (:meth:`rows_qkv`, :meth:`o_proj_mlp`)."""

    def __init__(self, model):
        check_model(model)
        cfg = model.config
        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)
        self.num_layers = len(self.layers)
        attn0 = self.layers[0].self_attn
        self.head_dim = int(getattr(attn0, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.scaling = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.has_qk_norm = hasattr(attn0, "q_norm") and hasattr(attn0, "k_norm")
        self.cache_kwarg = cache_kwarg(model)

    @property
    def device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache=None, logits_to_keep: int = 1):
        """The model's forward of ``input_ids`` ``[T]`` at ``position_ids`` ``[T]`` after the
        KV in ``cache``, with the logits of the last ``logits_to_keep`` positions (0: all)."""
        kwargs = {self.cache_kwarg: cache} if cache is not None else {}
        # Only the last position's logits are needed (as a serving engine computes them).
        return self.model(input_ids=input_ids[None].to(self.device), position_ids=position_ids[None].to(self.device),
                          use_cache=True, logits_to_keep=logits_to_keep, **kwargs)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` embeddings of ``input_ids`` ``[N]`` (on the model's device)."""
        return self.base.embed_tokens(input_ids[None])[0]

    def rotary_angles(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own RoPE ``cos``, ``sin`` ``[N, rotary_dim]`` at ``positions`` ``[N]``."""
        cos, sin = self.base.rotary_emb(hidden[None], positions[None])
        return cos[0], sin[0]

    def rows_qkv(self, layer, hidden: list, rotary: list) -> list:
        """Q/K/V of several requests' rows in one call per projection; per-request splits."""
        if len(hidden) == 1:
            return [self.layer_qkv(layer, hidden[0], *rotary[0])]
        sizes = [h.shape[0] for h in hidden]
        q, k, v = self.layer_qkv(layer, torch.cat(hidden), torch.cat([c for c, _ in rotary]),
                                 torch.cat([s for _, s in rotary]))
        return [list(t) for t in zip(q.split(sizes), k.split(sizes), v.split(sizes))]

    def layer_qkv(self, layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Q, K (RoPE applied at the rows' angles) and V ``[M, H, D]`` of rows ``h`` ``[M, hidden]``."""
        attn = layer.self_attn
        m = h.shape[0]
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(m, -1, self.head_dim)
        k = attn.k_proj(x).view(m, -1, self.head_dim)
        v = attn.v_proj(x).view(m, -1, self.head_dim)
        if self.has_qk_norm:
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def o_proj_mlp(self, layer, hidden: list, outs: list) -> list:
        """Output projection, residual and MLP of several requests' rows in one call each."""
        sizes = [h.shape[0] for h in hidden]
        h = torch.cat(hidden) if len(hidden) > 1 else hidden[0]
        o = torch.cat(outs) if len(outs) > 1 else outs[0]
        h = h + layer.self_attn.o_proj(o.reshape(o.shape[0], -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return list(h.split(sizes)) if len(hidden) > 1 else [h]

    def greedy(self, logits: torch.Tensor, cache, pos: int, max_new_tokens: int, stop_ids=()) -> tuple:
        """Greedy decoding after a prefill: ``logits`` choose the first token, which goes in
        at position ``pos``; stops after ``max_new_tokens`` tokens or at one of ``stop_ids``.
        Returns the tokens, the logits that chose each one and the extended cache."""
        tokens, all_logits = [], []
        for i in range(max_new_tokens):
            all_logits.append(logits)
            tok = int(logits.argmax())
            tokens.append(tok)
            if tok in stop_ids or i == max_new_tokens - 1:
                break
            out = self.forward(torch.tensor([tok]), torch.tensor([pos]), cache)
            cache = out_cache(out)
            logits = out.logits[0, -1].float()
            pos += 1
        return tokens, all_logits, cache

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """``[vocab]`` float32 logits of a final hidden state ``[1, hidden]``."""
        return self.model.lm_head(self.base.norm(last_hidden))[0].float()
