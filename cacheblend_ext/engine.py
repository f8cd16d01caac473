"""CacheBlend for Hugging Face Llama-family models (Llama/Mistral, Qwen2, Qwen3).

Usage::

    engine = BlendEngine(model, tokenizer, BlendConfig(recompute_ratio=0.15))
    chunks = [engine.encode_chunk(text) for text in passages]      # once, reusable
    result = engine.blend([prefix_text, *chunks, query_text])       # one request
    answer = engine.generate(result, max_new_tokens=32)             # greedy decode

A request is a list of *segments*: a :class:`~cacheblend_ext.chunk.ChunkKV` is reused
(its KV is re-positioned into the request), anything else (text, token ids) has no cached
KV and its tokens are *forced* (always recomputed). The last segment is normally the query.

Algorithm (per request, positions ``0..N-1``):

1. For each layer, the reused chunks' K/V are gathered into the request's KV buffer with
   their K re-rotated to the new positions (``fused_kv_concat``).
2. Layers before the first check layer run for all ``N`` tokens exactly like a prefill
   (their fresh K/V overwrite the reused ones).
3. At a check layer, fresh Q/K/V are computed for the current candidates (all tokens at
   the first check layer, the previous selection at later ones); the per-token deviation
   between fresh and reused K (or V, or both) picks the top ``ceil(r_l * N)`` non-forced
   candidates; forced tokens are always kept (``kv_deviation`` + ``select_hkvd``).
4. From the first check layer on, only the selected tokens' hidden states are carried:
   each layer computes their Q/K/V, writes their fresh K/V into the request's KV at their
   positions, runs exact position-causal sparse-query attention against all ``N`` keys,
   then the output projection and MLP for those tokens only.
5. The last token is always forced; its final hidden state gives the first-token logits.
   The blended KV (fresh where recomputed, reused elsewhere) becomes a ``DynamicCache``.

With ratio 1.0 every token is selected (a full prefill); with ratio 0 only forced tokens
are (full KV reuse: the query attends to the re-positioned chunk KV at every layer; layer
0's fresh KV equals the re-rotated cached KV up to rounding).

Layer-source protocol
---------------------
The reused KV is fetched one layer at a time through a *layer source*, so a chunk store
or a pipelined loader can feed the engine while it computes::

    class LayerSource(Protocol):
        def layer(self, l: int) -> Sequence[torch.Tensor]: ...

``layer(l)`` is called exactly once per layer, in ascending order ``0..L-1``, right before
the engine needs layer ``l``, and returns one ``[2, T_i, H_kv, D]`` tensor (K after RoPE at
the chunk's cached positions, then V; last dim contiguous, other strides free) per reused
chunk, in the order the chunks appear in the request, on the engine's device and in the
model's dtype. A loader may start fetching layer ``l + 1`` when ``layer(l)`` is called; the
tensors returned for layer ``l`` must stay valid until ``layer(l + 1)`` is called (CUDA:
produced on, or synchronised with, the current stream). The engine may ignore the layers
it recomputes fully. Optional ``close()`` is called when the blend ends.
:class:`InMemorySource` is the default (the ``ChunkKV`` objects' own tensors).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from . import _kernels
from .chunk import ChunkKV
from .identity import ModelIdentity
from .rope import rope_spec_from_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class LayerSource(Protocol):
    def layer(self, l: int) -> Sequence[torch.Tensor]: ...


class InMemorySource:
    """Layer source over in-memory :class:`ChunkKV` objects (moved to ``device`` per layer)."""

    def __init__(self, chunks: Sequence[ChunkKV], device=None, dtype=None):
        self.chunks = list(chunks)
        self.device = device
        self.dtype = dtype

    def layer(self, l: int) -> list[torch.Tensor]:
        return [c.kv[l].to(device=self.device, dtype=self.dtype, non_blocking=True) for c in self.chunks]

    def close(self) -> None:
        pass


@dataclass
class BlendConfig:
    """Blend settings.

    - ``recompute_ratio``: final fraction ``r`` of the request's tokens (non-forced) to recompute.
    - ``check_layers``: layers where selection happens (ascending). One layer (default
      ``(1,)``) is the published scheme; several give gradual filtering.
    - ``check_ratios``: per check layer ratio, falling, the last equal to ``recompute_ratio``;
      None gives a linear schedule from ``min(1, 2r)`` down to ``r`` (just ``r`` for one layer).
    - ``deviation``: ``"k"``, ``"v"`` or ``"kv"`` (sum of both).
    - ``chunk_prefix``: what a chunk is encoded after, its KV then dropped: ``"bos"`` (the
      tokenizer's BOS token, the default) or ``"none"`` (chunk encoded alone at position 0).
    - ``fresh_check_kv``: a check layer computes fresh K/V for all its candidates anyway;
      True keeps them for every candidate (not only the selected tokens) in the request's
      KV at that layer. No extra compute; with it, ratio 0 no longer equals full KV reuse
      at the check layers. Off by default.
    """

    recompute_ratio: float = 0.15
    check_layers: tuple[int, ...] = (1,)
    check_ratios: tuple[float, ...] | None = None
    deviation: str = "k"
    chunk_prefix: str = "bos"
    fresh_check_kv: bool = False

    def ratios(self) -> tuple[float, ...]:
        n = len(self.check_layers)
        if self.check_ratios is not None:
            if len(self.check_ratios) != n:
                raise ValueError(f"check_ratios has {len(self.check_ratios)} entries for {n} check layers")
            return tuple(float(r) for r in self.check_ratios)
        r = float(self.recompute_ratio)
        if n == 1:
            return (r,)
        top = min(1.0, 2 * r)
        return tuple(top + (r - top) * i / (n - 1) for i in range(n))

    def validate(self, num_layers: int) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        layers = tuple(self.check_layers)
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(f"check_layers must be non-empty and strictly ascending, got {layers}")
        if layers[0] < 0 or layers[-1] >= num_layers:
            raise ValueError(f"check_layers {layers} out of range for a {num_layers}-layer model")
        ratios = self.ratios()
        if any(not 0.0 <= r <= 1.0 for r in ratios) or any(a < b for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"check_ratios must lie in [0, 1] and not increase, got {ratios}")
        if self.deviation not in ("k", "v", "kv"):
            raise ValueError(f"deviation must be 'k', 'v' or 'kv', got {self.deviation!r}")
        if self.chunk_prefix not in ("bos", "none"):
            raise ValueError(f"chunk_prefix must be 'bos' or 'none', got {self.chunk_prefix!r}")


@dataclass
class BlendResult:
    """What one blended (or full) prefill returns.

    ``logits`` ``[vocab]`` float32 of the first output token; ``cache`` a ``DynamicCache``
    over all ``N`` request tokens that Hugging Face can continue from (feed the next token
    at position ``N``); ``input_ids`` ``[N]``; ``selected[l]`` the token indices computed
    at layer ``l`` (``None``: all tokens); ``forced`` ``[N]`` bool; ``timings`` in ms.
    """

    logits: torch.Tensor
    cache: object
    input_ids: torch.Tensor
    selected: list
    forced: torch.Tensor
    timings: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def recomputed_fraction(self, layer: int = -1) -> float:
        sel = self.selected[layer]
        return 1.0 if sel is None else sel.numel() / self.num_tokens


def _cache_kwarg(model) -> str:
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


def _out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's NeoX RoPE on ``x [M, H, D]`` with ``cos``/``sin`` ``[M, rotary_dim]``."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot, rest = (x, None) if rd == x.shape[-1] else (x[..., :rd], x[..., rd:])
    half = rd // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated_half * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


class BlendEngine:
    """CacheBlend over one Hugging Face causal LM (see the module docstring)."""

    def __init__(self, model, tokenizer=None, config: BlendConfig | None = None, model_id: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or BlendConfig()
        self._check_model(model)
        cfg = model.config
        self.base = model.model
        self.layers = list(self.base.layers)
        self.num_layers = len(self.layers)
        attn0 = self.layers[0].self_attn
        self.head_dim = int(getattr(attn0, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.scaling = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.has_qk_norm = hasattr(attn0, "q_norm") and hasattr(attn0, "k_norm")
        self.config.validate(self.num_layers)
        self._rope = None
        self._cache_kw = _cache_kwarg(model)
        # what chunk keys hash: weights, config and RoPE (``model_id`` overrides the model part)
        self.identity = ModelIdentity.of_model(model, model_id=model_id, head_dim=self.head_dim)
        self.model_id = self.identity.model_id

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _check_model(model) -> None:
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

    @property
    def device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.embed_tokens.weight.dtype

    def rope(self, max_position: int):
        """RoPE spec (vLLM-layout table) covering at least ``max_position`` positions."""
        if self._rope is None or self._rope.max_position < max_position:
            size = max(256, 1 << math.ceil(math.log2(max(max_position, 1))))
            self._rope = rope_spec_from_config(self.model.config, max_position=size, device=self.device)
        return self._rope

    def chunk_key(self, token_ids, prefix_ids=()) -> str:
        """Content key of the KV this engine gives ``token_ids`` encoded after ``prefix_ids``
        (see :mod:`cacheblend_ext.identity`)."""
        return self.identity.chunk_key(self.dtype, token_ids, prefix_ids)

    def tokenize(self, segment) -> torch.Tensor:
        if isinstance(segment, str):
            if self.tokenizer is None:
                raise ValueError("text segments need a tokenizer")
            ids = self.tokenizer(segment, add_special_tokens=False)["input_ids"]
            return torch.tensor(ids, dtype=torch.int64)
        return torch.as_tensor(segment, dtype=torch.int64).reshape(-1).cpu()

    def bos_ids(self) -> list[int]:
        """``[bos_token_id]`` of the model (or its tokenizer), ``[]`` when it has none."""
        bos = getattr(self.model.config, "bos_token_id", None)
        if bos is None and self.tokenizer is not None:
            bos = self.tokenizer.bos_token_id
        if isinstance(bos, (list, tuple)):
            bos = bos[0]
        return [] if bos is None else [int(bos)]

    def chunk_prefix_ids(self) -> list[int]:
        """The ids a chunk is encoded after under ``config.chunk_prefix`` (their KV is dropped)."""
        return self.bos_ids() if self.config.chunk_prefix == "bos" else []

    # ------------------------------------------------------------------ HF helpers

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache=None, logits_to_keep: int = 1):
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        # Only the last position's logits are needed (as a serving engine computes them).
        return self.model(input_ids=input_ids[None].to(self.device), position_ids=position_ids[None].to(self.device),
                          use_cache=True, logits_to_keep=logits_to_keep, **kwargs)

    @staticmethod
    def _cache_layers(cache):
        return [(layer.keys, layer.values) for layer in cache.layers]

    # ------------------------------------------------------------------ chunks

    @torch.inference_mode()
    def encode_chunk(self, segment) -> ChunkKV:
        """Prefill one chunk alone (after the configured prefix, whose KV is dropped)."""
        ids = self.tokenize(segment)
        if ids.numel() == 0:
            raise ValueError("cannot encode an empty chunk")
        prefix = self.chunk_prefix_ids()
        full = torch.tensor(prefix + ids.tolist(), dtype=torch.int64)
        pos = torch.arange(full.numel(), dtype=torch.int64)
        out = self._forward(full, pos)
        p = len(prefix)
        kv = torch.stack([torch.stack([k[0, :, p:].transpose(0, 1), v[0, :, p:].transpose(0, 1)])
                          for k, v in self._cache_layers(_out_cache(out))])
        key = self.chunk_key(ids, prefix)
        return ChunkKV(kv.contiguous(), pos[p:].clone(), ids, key, tuple(prefix))

    def encode_chunks(self, segments, progress=None) -> list[ChunkKV]:
        out = []
        for i, s in enumerate(segments):
            out.append(self.encode_chunk(s))
            if progress is not None:
                progress(i + 1, len(segments), out[-1])
        return out

    # ------------------------------------------------------------------ full prefill baselines

    @torch.inference_mode()
    def full_prefill(self, segments, reuse_prefix: ChunkKV | None = None) -> BlendResult:
        """Hugging Face prefill of the whole request (the quality and speed reference).

        ``reuse_prefix``: a chunk that is an exact prefix of the request (computed at
        positions ``0..P-1``, e.g. by :meth:`encode_prefix`): its KV is reused and only the
        rest is prefilled (prefix caching).
        """
        ids = torch.cat([s.token_ids if isinstance(s, ChunkKV) else self.tokenize(s) for s in segments])
        t0 = time.perf_counter()
        cache, start = None, 0
        if reuse_prefix is not None:
            p = reuse_prefix.num_tokens
            if not torch.equal(reuse_prefix.token_ids, ids[:p]) or int(reuse_prefix.positions[0]) != 0:
                raise ValueError("reuse_prefix must be an exact prefix of the request computed at position 0")
            kv = reuse_prefix.kv.to(self.device)
            # views: Hugging Face's cache concatenates into new tensors, the chunk is not modified
            cache = make_dynamic_cache(self.model, [kv[l, 0].transpose(0, 1)[None] for l in range(kv.shape[0])],
                                       [kv[l, 1].transpose(0, 1)[None] for l in range(kv.shape[0])])
            start = p
        pos = torch.arange(start, ids.numel(), dtype=torch.int64)
        out = self._forward(ids[start:], pos, cache)
        logits = out.logits[0, -1].float()
        self._sync()
        t = (time.perf_counter() - t0) * 1e3
        cache_out = _out_cache(out)
        return BlendResult(logits, cache_out, ids, [None] * self.num_layers,
                           torch.ones(ids.numel(), dtype=torch.bool), {"total_ms": t})

    @torch.inference_mode()
    def encode_prefix(self, segments) -> ChunkKV:
        """KV of ``segments`` prefilled together at position 0 (for prefix caching)."""
        ids = torch.cat([s.token_ids if isinstance(s, ChunkKV) else self.tokenize(s) for s in segments])
        pos = torch.arange(ids.numel(), dtype=torch.int64)
        out = self._forward(ids, pos)
        cache = _out_cache(out)
        kv = torch.stack([torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)]) for k, v in self._cache_layers(cache)])
        key = self.chunk_key(ids, ())
        return ChunkKV(kv.contiguous(), pos, ids, key, ())

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ blend

    def _layer_qkv(self, layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        attn = layer.self_attn
        m = h.shape[0]
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(m, -1, self.head_dim)
        k = attn.k_proj(x).view(m, -1, self.head_dim)
        v = attn.v_proj(x).view(m, -1, self.head_dim)
        if self.has_qk_norm:
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _deviation(self, k_fresh, v_fresh, k_reused, v_reused, index: torch.Tensor) -> torch.Tensor:
        mode = self.config.deviation
        if mode == "k":
            return _kernels.kv_deviation(k_fresh, k_reused, index)
        if mode == "v":
            return _kernels.kv_deviation(v_fresh, v_reused, index)
        dev = _kernels.kv_deviation(k_fresh, k_reused, index)
        return _kernels.kv_deviation(v_fresh, v_reused, index, out=dev, accumulate=True)

    @torch.inference_mode()
    def blend(self, segments, config: BlendConfig | None = None, source: LayerSource | None = None) -> BlendResult:
        """Blend ``segments`` (``ChunkKV`` reused; text / ids forced) into a prefill.

        ``source`` overrides where the reused chunks' per-layer KV comes from (see the
        layer-source protocol in the module docstring); by default the chunks' own tensors.
        """
        cfg = config or self.config
        cfg.validate(self.num_layers)
        t_start = time.perf_counter()
        device, dtype = self.device, self.dtype

        # -- request layout: token ids, forced mask, reused chunks' positions
        ids_parts, forced_parts, chunks, src_pos, dst_pos = [], [], [], [], []
        n = 0
        for seg in segments:
            if isinstance(seg, ChunkKV):
                if seg.num_layers != self.num_layers:
                    raise ValueError(f"chunk has {seg.num_layers} layers, the model {self.num_layers}")
                t = seg.num_tokens
                ids_parts.append(seg.token_ids)
                forced_parts.append(torch.zeros(t, dtype=torch.bool))
                chunks.append(seg)
                src_pos.append(seg.positions.cpu())
                dst_pos.append(torch.arange(n, n + t, dtype=torch.int64))
            else:
                ids = self.tokenize(seg)
                t = ids.numel()
                ids_parts.append(ids)
                forced_parts.append(torch.ones(t, dtype=torch.bool))
            n += t
        if n == 0:
            raise ValueError("empty request")
        window = getattr(self.model.config, "sliding_window", None)
        if window and getattr(self.model.config, "use_sliding_window", True) and n > window:
            raise ValueError(f"request of {n} tokens exceeds the model's sliding window ({window}); "
                             "sliding-window attention is not supported")
        ids = torch.cat(ids_parts)
        forced = torch.cat(forced_parts)
        forced[-1] = True  # the last token gives the first output token
        rope = self.rope(max(n, int(torch.cat(src_pos).max()) + 1 if src_pos else n))
        if source is None:
            source = InMemorySource(chunks, device, dtype)
        if chunks:
            src_all = torch.cat(src_pos).to(device)
            dst_all = torch.cat(dst_pos).to(device)

        # -- buffers: the request's KV in HF layout [L, H_kv, N, D]; token-major views for the ops
        kbuf = torch.empty(self.num_layers, self.num_kv_heads, n, self.head_dim, device=device, dtype=dtype)
        vbuf = torch.empty_like(kbuf)
        pos_all = torch.arange(n, device=device)
        forced_dev = forced.to(device)
        hidden = self.base.embed_tokens(ids.to(device)[None])[0]  # [N, hidden]
        cos_all, sin_all = self.base.rotary_emb(hidden[None], pos_all[None])
        cos_all, sin_all = cos_all[0], sin_all[0]

        check = dict(zip(cfg.check_layers, cfg.ratios()))
        selected: list = [None] * self.num_layers
        sel = None  # None: all tokens; else int64 positions (ascending) whose hidden states we carry
        timings = {"concat_ms": 0.0}
        try:
            for l, layer in enumerate(self.layers):
                reused = source.layer(l)
                k_tok = kbuf[l].transpose(0, 1)  # [N, H_kv, D] view
                v_tok = vbuf[l].transpose(0, 1)
                need_reused = sel is not None or l in check
                if chunks and need_reused:
                    t0 = time.perf_counter()
                    _kernels.fused_kv_concat([c[None] for c in reused], src_all, dst_all, dst_all,
                                             rope.cos_sin_cache, rope.is_neox, [k_tok], [v_tok])
                    timings["concat_ms"] += (time.perf_counter() - t0) * 1e3
                pos = pos_all if sel is None else sel
                cos, sin = (cos_all, sin_all) if sel is None else (cos_all[sel], sin_all[sel])
                q, k, v = self._layer_qkv(layer, hidden, cos, sin)

                if l in check:
                    if cfg.fresh_check_kv:  # after the deviation below reads the reused K/V
                        fresh_rows = (k, v)
                    rows_forced = forced_dev if sel is None else forced_dev[sel]
                    cand_rows = (~rows_forced).nonzero().flatten()
                    num_cand = cand_rows.numel()
                    if num_cand:
                        budget = min(math.ceil(check[l] * n - 1e-9), num_cand)
                        cand_pos = cand_rows if sel is None else sel[cand_rows]
                        dev = self._deviation(k[cand_rows], v[cand_rows], k_tok, v_tok, cand_pos)
                        pick = _kernels.select_hkvd(dev, budget)
                        keep = torch.cat([rows_forced.nonzero().flatten(), cand_rows[pick]]).sort().values
                    else:
                        keep = rows_forced.nonzero().flatten()
                    if cfg.fresh_check_kv:
                        rows = pos_all if sel is None else sel
                        k_tok[rows], v_tok[rows] = fresh_rows
                    if not (sel is None and keep.numel() == n):  # all kept: stay on the full path
                        sel = keep if sel is None else sel[keep]
                        q, k, v, hidden = q[keep], k[keep], v[keep], hidden[keep]
                        pos = sel

                attn = layer.self_attn
                if sel is None:
                    k_tok.copy_(k)
                    v_tok.copy_(v)
                    o = F.scaled_dot_product_attention(
                        q.transpose(0, 1)[None], kbuf[l][None], vbuf[l][None], is_causal=True,
                        scale=self.scaling, enable_gqa=self.num_heads != self.num_kv_heads)[0].transpose(0, 1)
                else:
                    k_tok[sel] = k
                    v_tok[sel] = v
                    o = _kernels.sparse_query_attention(q, k_tok, v_tok, pos, self.scaling)
                selected[l] = sel
                hidden = hidden + attn.o_proj(o.reshape(o.shape[0], -1))
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

        last = self.base.norm(hidden[-1:])
        logits = self.model.lm_head(last)[0].float()
        cache = make_dynamic_cache(self.model, [kbuf[l][None] for l in range(self.num_layers)],
                                   [vbuf[l][None] for l in range(self.num_layers)])
        self._sync()
        timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
        return BlendResult(logits, cache, ids, selected, forced, timings)

    # ------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def generate(self, result: BlendResult, max_new_tokens: int = 32, stop_at_eos: bool = True,
                 return_logits: bool = False):
        """Greedy decoding from a prefill result (blend or full). Returns the new token ids
        (and, with ``return_logits``, the ``[T, vocab]`` float32 logits that chose them).
        The result's cache is extended in place."""
        eos = getattr(self.model.config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        tokens, all_logits = [], []
        logits = result.logits
        pos = result.num_tokens
        cache = result.cache
        for i in range(max_new_tokens):
            all_logits.append(logits)
            tok = int(logits.argmax())
            tokens.append(tok)
            if (stop_at_eos and tok in eos) or i == max_new_tokens - 1:
                break
            out = self._forward(torch.tensor([tok]), torch.tensor([pos]), cache)
            cache = _out_cache(out)
            logits = out.logits[0, -1].float()
            pos += 1
        result.cache = cache
        if return_logits:
            return tokens, torch.stack(all_logits)
        return tokens
