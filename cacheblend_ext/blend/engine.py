"""CacheBlend for Hugging Face Llama-family models (Llama/Mistral, Qwen2, Qwen3).

Usage::

    engine = BlendEngine(model, tokenizer, BlendConfig(recompute_ratio=0.15))
    chunks = [engine.encode_chunk(text) for text in passages]      # once, reusable
    result = engine.blend([prefix_text, *chunks, query_text])       # one request
    answer = engine.generate(result, max_new_tokens=32)             # greedy decode

A request is a list of *segments*: a :class:`~cacheblend_ext.chunk.ChunkKV` is reused
(its KV is re-positioned into the request), anything else (text, token ids) has no cached
KV and its tokens are *forced* (always recomputed). The last segment is normally the query.

Algorithm (per request, positions ``0..N-1``; :meth:`BlendEngine.blend`, or several
requests at once with :meth:`BlendEngine.blend_batch`):

1. Plan: forced tokens, where each chunk goes, and how many tokens each check layer keeps
   so that the request fits the compute budget (:func:`selection_schedule`).
2. For each layer, the reused chunks' K/V are gathered into the request's KV buffer with
   their K re-rotated to the new positions (``fused_kv_concat``).
3. Probe (``selection="probe"``, the default): the last query tokens run through every
   layer over the reused KV alone; the attention they pay each token ranks the tokens.
4. Layers before the first check layer run for all ``N`` tokens exactly like a prefill
   (their fresh K/V overwrite the reused ones); the default check layer is 0.
5. At a check layer, fresh Q/K/V are computed for the current candidates (all tokens at
   the first check layer, the previous selection at later ones); the top non-forced
   candidates by the ranking (the probe's attention, or the deviation between fresh and
   reused K / V: ``kv_deviation``) are kept with every forced token (``select_hkvd``).
6. From the first check layer on, only the selected tokens' hidden states are carried:
   each layer computes their Q/K/V, writes their fresh K/V into the request's KV at their
   positions, runs exact position-causal sparse-query attention against all ``N`` keys,
   then the output projection and MLP for those tokens only.
7. The last token is always forced; its final hidden state gives the first-token logits.
   The blended KV (fresh where recomputed, reused elsewhere) becomes a ``DynamicCache``.

With ratio 1.0 every token is selected (a full prefill); with ratio 0 only forced tokens
are (full KV reuse: the query attends to the re-positioned chunk KV at every layer; layer
0's fresh KV equals the re-rotated cached KV up to rounding).

The reused KV arrives one layer at a time through a *layer source* (the protocol:
:mod:`cacheblend_ext.layer_source`); by default the request's ``ChunkKV`` objects' own
tensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..chunk import ChunkKV
from ..identity import ModelIdentity
from ..layer_source import LayerSource, MemoryLayerSource
from ..rope import rope_spec_from_config
from .config import BlendConfig
from .hf import cache_kwarg, cache_layers, check_model, make_dynamic_cache, out_cache, rotate
from .schedule import selection_schedule

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
    probe_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def recomputed_fraction(self, layer: int = -1) -> float:
        """Fraction of the request's tokens computed at ``layer`` (the last by default)."""
        sel = self.selected[layer]
        return 1.0 if sel is None else sel.numel() / self.num_tokens

    def compute_fraction(self) -> float:
        """Token-layers computed (attention and MLP, the probe pass's rows included) over
        ``N * L``: the share of a full prefill's compute this blend spent (a check layer's
        Q/K/V of its rejected candidates is not counted)."""
        n, layers = self.num_tokens, len(self.selected)
        main = sum(n if s is None else s.numel() for s in self.selected)
        return (main + self.probe_tokens * layers) / (n * layers)


@dataclass
class RequestPlan:
    """A request laid out for blending (:meth:`BlendEngine.plan_request`).

    ``input_ids`` ``[N]``; ``forced`` ``[N]`` bool (tokens without cached KV, and the last
    token); ``chunks`` the reused chunks in request order, ``spans`` their ``(start, end)``
    positions and ``src_pos`` the positions their K was rotated at (concatenated);
    ``check`` maps each check layer to the number of non-forced tokens it keeps;
    ``probe_rows`` the positions the probe pass runs (empty: no probe).
    """

    config: BlendConfig
    input_ids: torch.Tensor
    forced: torch.Tensor
    chunks: list
    spans: list
    src_pos: torch.Tensor | None
    check: dict
    probe_rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class _BlendState:
    """Per-request state while the layers run: the request's KV buffers, the hidden states
    of the rows still computed (``sel``: their positions, ``None`` for all) and timings."""

    plan: RequestPlan
    rope: object
    kbuf: torch.Tensor  # [L, H_kv, N, D]
    vbuf: torch.Tensor
    positions: torch.Tensor  # [N] on the device
    forced: torch.Tensor  # [N] bool on the device
    hidden: torch.Tensor  # [rows, hidden]
    cos: torch.Tensor  # [N, rotary_dim]
    sin: torch.Tensor
    src_pos: torch.Tensor | None
    dst_pos: torch.Tensor | None
    sel: torch.Tensor | None = None
    rank_scores: torch.Tensor | None = None
    probe_mass: torch.Tensor | None = None  # [L, N] (probe selection)
    batch_kv: tuple | None = None  # in a batched blend: the batch's (K, V) buffers kbuf / vbuf are slices of
    batch_offset: int = 0  # where this request's tokens start in them
    selected: list = field(default_factory=list)
    timings: dict = field(default_factory=lambda: {"concat_ms": 0.0, "select_ms": 0.0})

    def rows(self) -> torch.Tensor:
        """Positions of the rows computed at the current layer."""
        return self.positions if self.sel is None else self.sel

    def rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.cos, self.sin) if self.sel is None else (self.cos[self.sel], self.sin[self.sel])

    def layer_kv(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-major ``[N, H_kv, D]`` views of layer ``l``'s K and V."""
        return self.kbuf[l].transpose(0, 1), self.vbuf[l].transpose(0, 1)


def _per_chunk_top(score: torch.Tensor, pos: torch.Tensor, spans, k: int) -> torch.Tensor:
    """Indices of ``k`` tokens, each chunk's share proportional to its candidates (largest
    remainders get the leftover), the top scores within each chunk."""
    starts = torch.tensor([a for a, _ in spans], device=pos.device)
    chunk = torch.searchsorted(starts, pos, right=True) - 1
    sizes = torch.bincount(chunk, minlength=len(spans)).cpu()
    exact = sizes.double() * k / max(int(sizes.sum()), 1)
    quota = exact.floor().long()
    left = k - int(quota.sum())
    if left > 0:  # largest remainder first, ties to the earlier chunk
        order = sorted(range(len(spans)), key=lambda i: (-(float(exact[i]) - int(quota[i])), i))
        for i in order[:left]:
            quota[i] += 1
    picks = []
    for i in range(len(spans)):
        members = (chunk == i).nonzero().flatten()
        if quota[i] > 0:
            picks.append(members[ops.select_hkvd(score[members], int(quota[i]))])
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.int64, device=score.device)


class BlendEngine:
    """CacheBlend over one Hugging Face causal LM (see the module docstring)."""

    def __init__(self, model, tokenizer=None, config: BlendConfig | None = None, model_id: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or BlendConfig()
        check_model(model)
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
        self._cache_kw = cache_kwarg(model)
        # what chunk keys hash: weights, config and RoPE (``model_id`` overrides the model part)
        self.identity = ModelIdentity.of_model(model, model_id=model_id, head_dim=self.head_dim)
        self.model_id = self.identity.model_id

    # ------------------------------------------------------------------ setup

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

    def chunk_context(self, prefix, config: BlendConfig | None = None):
        """What a chunk used after ``prefix`` (text, ids or None) is encoded after: ``prefix``
        under ``chunk_prefix="prefix"``, else None (the configured default of
        :meth:`chunk_prefix_ids`)."""
        cfg = config or self.config
        return prefix if cfg.chunk_prefix == "prefix" and prefix is not None else None

    def chunk_prefix_ids(self, context=None) -> list[int]:
        """The ids a chunk is encoded after (their KV is dropped): ``context`` (text or ids)
        tokenized, else those of ``config.chunk_prefix`` (``"none"``: nothing; ``"bos"``, and
        ``"prefix"`` when no request prefix is given: BOS)."""
        if context is not None:
            return self.tokenize(context).tolist()
        return [] if self.config.chunk_prefix == "none" else self.bos_ids()

    # ------------------------------------------------------------------ HF helpers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache=None, logits_to_keep: int = 1):
        """The model's forward of ``input_ids`` ``[T]`` at ``position_ids`` ``[T]`` after the
        KV in ``cache``, with the logits of the last ``logits_to_keep`` positions (0: all)."""
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        # Only the last position's logits are needed (as a serving engine computes them).
        return self.model(input_ids=input_ids[None].to(self.device), position_ids=position_ids[None].to(self.device),
                          use_cache=True, logits_to_keep=logits_to_keep, **kwargs)

    # ------------------------------------------------------------------ chunks

    @torch.inference_mode()
    def encode_chunk(self, segment, context=None) -> ChunkKV:
        """Prefill one chunk after a context whose KV is dropped.

        ``context`` (text or token ids) is what the chunk is encoded after, e.g. the
        system prompt the chunk will be used with; by default the configured
        ``chunk_prefix`` (BOS, or nothing). The context's ids are part of the chunk's key.
        """
        ids = self.tokenize(segment)
        if ids.numel() == 0:
            raise ValueError("cannot encode an empty chunk")
        prefix = self.chunk_prefix_ids(context)
        self._check_positions(len(prefix) + ids.numel(),
                              f"chunk of {ids.numel()} tokens after {len(prefix)} context tokens")
        full = torch.tensor(prefix + ids.tolist(), dtype=torch.int64)
        pos = torch.arange(full.numel(), dtype=torch.int64)
        out = self.forward(full, pos)
        p = len(prefix)
        kv = torch.stack([torch.stack([k[0, :, p:].transpose(0, 1), v[0, :, p:].transpose(0, 1)])
                          for k, v in cache_layers(out_cache(out))])
        key = self.chunk_key(ids, prefix)
        return ChunkKV(kv.contiguous(), pos[p:].clone(), ids, key, tuple(prefix))

    def encode_chunks(self, segments, progress=None, context=None) -> list[ChunkKV]:
        out = []
        for i, s in enumerate(segments):
            out.append(self.encode_chunk(s, context))
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
        self._check_positions(ids.numel(), f"request of {ids.numel()} tokens")
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
        out = self.forward(ids[start:], pos, cache)
        logits = out.logits[0, -1].float()
        self._sync()
        t = (time.perf_counter() - t0) * 1e3
        cache_out = out_cache(out)
        return BlendResult(logits, cache_out, ids, [None] * self.num_layers,
                           torch.ones(ids.numel(), dtype=torch.bool), {"total_ms": t})

    @torch.inference_mode()
    def encode_prefix(self, segments) -> ChunkKV:
        """KV of ``segments`` prefilled together at position 0 (for prefix caching)."""
        ids = torch.cat([s.token_ids if isinstance(s, ChunkKV) else self.tokenize(s) for s in segments])
        pos = torch.arange(ids.numel(), dtype=torch.int64)
        out = self.forward(ids, pos)
        cache = out_cache(out)
        kv = torch.stack([torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)]) for k, v in cache_layers(cache)])
        key = self.chunk_key(ids, ())
        return ChunkKV(kv.contiguous(), pos, ids, key, ())

    def _check_chunk(self, chunk: ChunkKV, name: str) -> None:
        """Refuse chunk KV that this model cannot use: wrong shape, or a key that is not the
        one this model, RoPE configuration and dtype give its tokens (KV of another model
        would blend into wrong answers without an error)."""
        want = (self.num_layers, 2, chunk.num_tokens, self.num_kv_heads, self.head_dim)
        if tuple(chunk.kv.shape) != want:
            raise ValueError(f"{name}: chunk KV must be [L={want[0]}, 2, T, H_kv={want[3]}, D={want[4]}] "
                             f"for this model, got {tuple(chunk.kv.shape)}")
        try:
            self.identity.check_chunk(chunk, self.dtype)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None

    def _check_positions(self, n: int, what: str) -> None:
        """Refuse work that needs more positions than the model has (its RoPE was not
        trained past them, and some engines' tables end there)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and n > limit:
            raise ValueError(f"{what} exceeds the model's max_position_embeddings ({limit})")

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ blend

    @torch.inference_mode()
    def blend(self, segments, config: BlendConfig | None = None, source: LayerSource | None = None,
              rank_scores: torch.Tensor | None = None) -> BlendResult:
        """Blend ``segments`` (``ChunkKV`` reused; text / ids forced) into a prefill.

        ``config`` overrides the engine's :class:`BlendConfig` for this call. ``source``
        overrides where the reused chunks' per-layer KV comes from (see the layer-source
        protocol in :mod:`cacheblend_ext.layer_source`); by default the chunks' own tensors.
        ``rank_scores`` ``[N]``, if given, ranks the candidates at every check layer in
        place of the configured deviation (for experiments with other rankings, such as
        the hindsight yardstick of ``bench quality``).
        """
        cfg = config or self.config
        cfg.validate(self.num_layers)
        t_start = time.perf_counter()
        plan = self.plan_request(segments, cfg)
        if source is None:
            source = MemoryLayerSource.of_chunks(plan.chunks, self.device, self.dtype)
        state = self._start(plan)
        if rank_scores is not None:
            if rank_scores.shape != (plan.num_tokens,):
                raise ValueError(f"rank_scores must be [{plan.num_tokens}], got {tuple(rank_scores.shape)}")
            state.rank_scores = rank_scores.to(self.device, torch.float32)
        try:
            self._run_layers([state], [source])
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        result = self._finish(state)
        result.timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
        return result

    @torch.inference_mode()
    def blend_batch(self, requests: Sequence, config: BlendConfig | None = None) -> list[BlendResult]:
        """Blend several requests in one pass: a ragged batch whose rows share every
        projection and MLP call (one weight read per layer for the whole batch) and, once
        they are all selective, one ``sparse_query_attention`` call over the batch's KV.

        ``requests`` is a list of segment lists as :meth:`blend` takes them (chunk KV in
        memory); ``config`` applies to all. Each request is planned, ranked and selected on
        its own, so each result is the one :meth:`blend` gives it (selections identical,
        logits equal up to the rounding of the larger matrix products). The results' caches
        are views of one KV buffer of the whole batch. ``timings["total_ms"]`` is the
        batch's time.
        """
        cfg = config or self.config
        cfg.validate(self.num_layers)
        if not requests:
            raise ValueError("requests must hold at least one request")
        t_start = time.perf_counter()
        plans = [self.plan_request(segments, cfg) for segments in requests]
        total = sum(p.num_tokens for p in plans)
        shape = (self.num_layers, self.num_kv_heads, total, self.head_dim)
        kbig = torch.empty(shape, device=self.device, dtype=self.dtype)
        vbig = torch.empty_like(kbig)
        states, offset = [], 0
        for plan in plans:  # each request's KV: a slice of the batch buffer (a view)
            n = plan.num_tokens
            state = self._start(plan, kbig[:, :, offset:offset + n], vbig[:, :, offset:offset + n])
            state.batch_kv, state.batch_offset = (kbig, vbig), offset
            states.append(state)
            offset += n
        self._run_layers(states, [MemoryLayerSource.of_chunks(p.chunks, self.device, self.dtype) for p in plans])
        results = [self._finish(state) for state in states]
        elapsed = (time.perf_counter() - t_start) * 1e3
        for result in results:
            result.timings["total_ms"] = elapsed
            result.timings["batch_size"] = len(results)
        return results

    # -- the blend's steps, in order

    def plan_request(self, segments, config: BlendConfig | None = None) -> "RequestPlan":
        """Lay a request out: token ids, forced tokens, where each reused chunk goes, and
        how many tokens each check layer keeps (:func:`selection_schedule`)."""
        cfg = config or self.config
        ids_parts, forced_parts, chunks, spans, src_pos = [], [], [], [], []
        n = 0
        for i, seg in enumerate(segments):
            if isinstance(seg, ChunkKV):
                self._check_chunk(seg, f"segments[{i}]")
                t = seg.num_tokens
                ids_parts.append(seg.token_ids)
                forced_parts.append(torch.zeros(t, dtype=torch.bool))
                chunks.append(seg)
                spans.append((n, n + t))
                src_pos.append(seg.positions.cpu())
            else:
                ids = self.tokenize(seg)
                t = ids.numel()
                ids_parts.append(ids)
                forced_parts.append(torch.ones(t, dtype=torch.bool))
            n += t
        if n == 0:
            raise ValueError("empty request")
        self._check_positions(n, f"request of {n} tokens")
        window = getattr(self.model.config, "sliding_window", None)
        if window and getattr(self.model.config, "use_sliding_window", True) and n > window:
            raise ValueError(f"request of {n} tokens exceeds the model's sliding window ({window}); "
                             "sliding-window attention is not supported")
        forced = torch.cat(forced_parts)
        forced[-1] = True  # the last token gives the first output token
        probe = torch.zeros(0, dtype=torch.int64)
        if chunks and cfg.selection == "probe":  # the query: forced tokens after the last chunk's start
            probe = forced[spans[-1][0]:].nonzero().flatten()[-cfg.probe_tokens:] + spans[-1][0]
        schedule = selection_schedule(cfg, n, int(forced.sum()), self.num_layers, probe.numel())
        return RequestPlan(cfg, torch.cat(ids_parts), forced, chunks, spans,
                           torch.cat(src_pos) if chunks else None, dict(zip(schedule.layers, schedule.picks)),
                           probe[: schedule.probe_rows] if schedule.probe_rows else probe[:0])

    def _start(self, plan: "RequestPlan", kbuf: torch.Tensor | None = None,
               vbuf: torch.Tensor | None = None) -> "_BlendState":
        """Buffers for the request's KV (``kbuf`` / ``vbuf`` if given: views of a batch's
        buffer), the embeddings and the RoPE angles of every position."""
        n, device = plan.num_tokens, self.device
        max_src = int(plan.src_pos.max()) + 1 if plan.chunks else 0
        rope = self.rope(max(n, max_src))
        # the request's KV in HF layout [L, H_kv, N, D]; the ops see token-major views
        if kbuf is None:
            kbuf = torch.empty(self.num_layers, self.num_kv_heads, n, self.head_dim, device=device, dtype=self.dtype)
            vbuf = torch.empty_like(kbuf)
        positions = torch.arange(n, device=device)
        hidden = self.base.embed_tokens(plan.input_ids.to(device)[None])[0]  # [N, hidden]
        cos, sin = self.base.rotary_emb(hidden[None], positions[None])
        dst = torch.cat([torch.arange(a, b) for a, b in plan.spans]).to(device) if plan.chunks else None
        return _BlendState(plan, rope, kbuf, vbuf, positions, plan.forced.to(device), hidden, cos[0], sin[0],
                           plan.src_pos.to(device) if plan.chunks else None, dst)

    def _place_reused(self, state: "_BlendState", l: int, reused: Sequence[torch.Tensor]) -> None:
        """Gather the reused chunks' layer-``l`` KV into the request at their new positions (K re-rotated)."""
        t0 = time.perf_counter()
        k_tok, v_tok = state.layer_kv(l)
        ops.fused_kv_concat([c[None] for c in reused], state.src_pos, state.dst_pos, state.dst_pos,
                                 state.rope.cos_sin_cache, state.rope.is_neox, [k_tok], [v_tok])
        state.timings["concat_ms"] += (time.perf_counter() - t0) * 1e3

    def _run_layers(self, states: list, sources: list) -> None:
        """The probe (where planned), then every layer for all ``states`` together: their
        rows share the projection and MLP calls; ranking and selection stay per request."""
        probed = [s.plan.probe_rows.numel() > 0 for s in states]
        if any(probed):  # the probe reads every layer's reused KV and leaves it in place
            self._probe([s for s, p in zip(states, probed) if p], [src for src, p in zip(sources, probed) if p])
        for l, layer in enumerate(self.layers):
            for state, source, placed in zip(states, sources, probed):
                if not placed:
                    reused = source.layer(l) if state.plan.chunks else []
                    if state.plan.chunks and (state.sel is not None or l in state.plan.check):
                        self._place_reused(state, l, reused)
            qkv = self._rows_qkv(layer, [s.hidden for s in states], [s.rotary() for s in states])
            for i, state in enumerate(states):
                if l in state.plan.check:
                    qkv[i] = self._select(state, l, *qkv[i])
            outs = self._attend(states, l, qkv)
            hidden = self._o_proj_mlp(layer, [s.hidden for s in states], outs)
            for state, h in zip(states, hidden):
                state.hidden = h

    def _probe(self, states: list, sources: list) -> None:
        """The probe pass: each request's probe rows (its last query tokens) run through
        every layer over the reused KV alone, as in full KV reuse; ``state.probe_mass[l]``
        is the attention they pay each position at layer ``l``, summed over rows and heads.
        Every layer's reused KV is left placed in the request's buffers for the main pass."""
        t0, concat0 = time.perf_counter(), [s.timings["concat_ms"] for s in states]
        rows = [s.plan.probe_rows.to(self.device) for s in states]
        hidden = [s.hidden[r] for s, r in zip(states, rows)]
        rotary = [(s.cos[r], s.sin[r]) for s, r in zip(states, rows)]
        group = self.num_heads // self.num_kv_heads
        visible = []
        for state, r in zip(states, rows):
            # The probe sees the reused KV and its own rows (exact position-causal mask); other
            # tokens without cached KV (the prefix, the start of a long query) have no KV yet.
            known = ~state.forced
            known[r] = True
            visible.append((state.positions[None, :] <= r[:, None]) & known[None, :])  # [P, N]
            unknown = (~known).nonzero().flatten()
            state.kbuf[:, :, unknown] = 0  # masked out, but 0 * NaN would still reach the output
            state.vbuf[:, :, unknown] = 0
            state.probe_mass = torch.zeros(self.num_layers, state.plan.num_tokens, device=self.device,
                                           dtype=torch.float32)
        for l, layer in enumerate(self.layers):
            outs = []
            for state, source, r, vis, (q, k, v) in zip(states, sources, rows, visible,
                                                         self._rows_qkv(layer, hidden, rotary)):
                self._place_reused(state, l, source.layer(l))
                k_tok, v_tok = state.layer_kv(l)
                k_tok[r], v_tok[r] = k, v
                qg = q.float().view(r.numel(), self.num_kv_heads, group, self.head_dim)
                scores = torch.einsum("phgd,nhd->phgn", qg, k_tok.float()) * self.scaling
                probs = scores.masked_fill(~vis[:, None, None, :], float("-inf")).softmax(-1)
                state.probe_mass[l] = probs.sum((0, 1, 2))
                outs.append(torch.einsum("phgn,nhd->phgd", probs, v_tok.float()).to(q.dtype))
            hidden = self._o_proj_mlp(layer, hidden, outs)
        elapsed = (time.perf_counter() - t0) * 1e3
        for state, c0 in zip(states, concat0):
            # the probe's own time: placing the reused KV is the main pass's work done early
            state.timings["probe_ms"] = elapsed - (state.timings["concat_ms"] - c0)

    def _rows_qkv(self, layer, hidden: list, rotary: list) -> list:
        """Q/K/V of several requests' rows in one call per projection; per-request splits."""
        if len(hidden) == 1:
            return [self._layer_qkv(layer, hidden[0], *rotary[0])]
        sizes = [h.shape[0] for h in hidden]
        q, k, v = self._layer_qkv(layer, torch.cat(hidden), torch.cat([c for c, _ in rotary]),
                                  torch.cat([s for _, s in rotary]))
        return [list(t) for t in zip(q.split(sizes), k.split(sizes), v.split(sizes))]

    def _o_proj_mlp(self, layer, hidden: list, outs: list) -> list:
        """Output projection, residual and MLP of several requests' rows in one call each."""
        sizes = [h.shape[0] for h in hidden]
        h = torch.cat(hidden) if len(hidden) > 1 else hidden[0]
        o = torch.cat(outs) if len(outs) > 1 else outs[0]
        h = h + layer.self_attn.o_proj(o.reshape(o.shape[0], -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return list(h.split(sizes)) if len(hidden) > 1 else [h]

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
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _select(self, state: "_BlendState", l: int, q, k, v):
        """At a check layer: rank the candidates (the rows computed so far that are not
        forced) and keep the top ones plus every forced row; returns the kept rows' Q/K/V."""
        t0 = time.perf_counter()
        cfg, plan = state.plan.config, state.plan
        k_tok, v_tok = state.layer_kv(l)
        rows = state.rows()
        rows_forced = state.forced[rows]
        cand = (~rows_forced).nonzero().flatten()
        budget = min(plan.check[l], cand.numel())
        if budget > 0:
            cand_pos = rows[cand]
            if state.rank_scores is not None:
                score = state.rank_scores[cand_pos].contiguous()
            elif state.probe_mass is not None:  # the probe's attention where this selection takes effect
                score = state.probe_mass[l:].sum(0)[cand_pos]
            else:
                score = self._deviation(cfg, k[cand], v[cand], k_tok, v_tok, cand_pos)
            if cfg.selection == "impact" and state.rank_scores is None:
                score = score * self._query_attention_mass(state, l, q, k, rows)[cand_pos]
            pick = self._top_candidates(cfg, plan, score, cand_pos, budget)
            keep = torch.cat([rows_forced.nonzero().flatten(), cand[pick]]).sort().values
        else:
            keep = rows_forced.nonzero().flatten()
        if cfg.fresh_check_kv:  # after the deviation above has read the reused K/V
            k_tok[rows], v_tok[rows] = k, v
        if not (state.sel is None and keep.numel() == plan.num_tokens):  # all kept: stay on the full path
            state.sel = rows[keep]
            q, k, v, state.hidden = q[keep], k[keep], v[keep], state.hidden[keep]
        state.timings["select_ms"] += (time.perf_counter() - t0) * 1e3
        return q, k, v

    @staticmethod
    def _deviation(cfg: BlendConfig, k_fresh, v_fresh, k_reused, v_reused, index: torch.Tensor) -> torch.Tensor:
        if cfg.deviation == "k":
            return ops.kv_deviation(k_fresh, k_reused, index)
        if cfg.deviation == "v":
            return ops.kv_deviation(v_fresh, v_reused, index)
        dev = ops.kv_deviation(k_fresh, k_reused, index)
        return ops.kv_deviation(v_fresh, v_reused, index, out=dev, accumulate=True)

    def _query_attention_mass(self, state: "_BlendState", l: int, q, k, rows) -> torch.Tensor:
        """``[N]`` float32: the attention the query rows (forced rows after the last reused
        chunk) pay each position at this layer, summed over rows and heads; keys are the
        fresh K of the computed rows and the reused K elsewhere."""
        query_start = state.plan.spans[-1][1]
        qrows = (rows >= query_start).nonzero().flatten()
        keys = state.layer_kv(l)[0].clone()
        keys[rows] = k
        group = self.num_heads // self.num_kv_heads
        qg = q[qrows].float().view(qrows.numel(), self.num_kv_heads, group, self.head_dim)
        scores = torch.einsum("mhgd,nhd->mhgn", qg, keys.float()) * self.scaling
        visible = state.positions[None, :] <= rows[qrows][:, None]  # [m, N] exact causal mask
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        return scores.softmax(-1).sum((0, 1, 2))

    @staticmethod
    def _top_candidates(cfg: BlendConfig, plan: "RequestPlan", score: torch.Tensor, cand_pos: torch.Tensor,
                        budget: int) -> torch.Tensor:
        """Indices into the candidates of the ``budget`` tokens kept: the chunk-boundary
        tokens first, then the highest scores, over the request or per chunk."""
        prio = torch.zeros_like(score, dtype=torch.bool)
        if cfg.boundary_tokens:
            starts = torch.tensor([a for a, _ in plan.spans], device=cand_pos.device)
            chunk = torch.searchsorted(starts, cand_pos, right=True) - 1
            prio = cand_pos - starts[chunk] < cfg.boundary_tokens
        first = prio.nonzero().flatten()
        if first.numel() >= budget:
            return first[ops.select_hkvd(score[first], budget)]
        rest = (~prio).nonzero().flatten()
        need = budget - first.numel()
        if cfg.quota == "global":
            chosen = rest[ops.select_hkvd(score[rest], need)]
        else:
            chosen = rest[_per_chunk_top(score[rest], cand_pos[rest], plan.spans, need)]
        return torch.cat([first, chosen])

    def _attend(self, states: list, l: int, qkv: list) -> list:
        """Write each request's computed rows' fresh K/V into its KV, then attend: causal
        prefill on the full path, exact position-causal sparse-query attention on the
        selective path (one ragged call when every request of a batch is selective).
        Returns each request's attention output ``[rows, Hq, D]``."""
        outs = [None] * len(states)
        for i, (state, (q, k, v)) in enumerate(zip(states, qkv)):
            k_tok, v_tok = state.layer_kv(l)
            if state.sel is None:
                k_tok.copy_(k)
                v_tok.copy_(v)
                outs[i] = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], state.kbuf[l][None], state.vbuf[l][None], is_causal=True,
                    scale=self.scaling, enable_gqa=self.num_heads != self.num_kv_heads)[0].transpose(0, 1)
            else:
                k_tok[state.sel] = k
                v_tok[state.sel] = v
            state.selected.append(state.sel)
        sparse = [i for i, s in enumerate(states) if s.sel is not None]
        if len(sparse) > 1 and len(sparse) == len(states):  # one ragged call over the batch buffer
            kbig, vbig = states[0].batch_kv
            counts = torch.tensor([0] + [s.sel.numel() for s in states])
            q_indptr = counts.cumsum(0).to(self.device)
            kv_indptr = torch.tensor([s.batch_offset for s in states] + [kbig.shape[2]], device=self.device)
            o = ops.sparse_query_attention(
                torch.cat([q for q, _, _ in qkv]), kbig[l].transpose(0, 1), vbig[l].transpose(0, 1),
                torch.cat([s.sel for s in states]), self.scaling, q_indptr=q_indptr, kv_indptr=kv_indptr)
            return list(o.split(counts[1:].tolist()))
        for i in sparse:
            k_tok, v_tok = states[i].layer_kv(l)
            outs[i] = ops.sparse_query_attention(qkv[i][0], k_tok, v_tok, states[i].sel, self.scaling)
        return outs

    def _finish(self, state: "_BlendState") -> BlendResult:
        """First-token logits from the last token; the blended KV as a ``DynamicCache`` (views)."""
        last = self.base.norm(state.hidden[-1:])
        logits = self.model.lm_head(last)[0].float()
        cache = make_dynamic_cache(self.model, [state.kbuf[l][None] for l in range(self.num_layers)],
                                   [state.vbuf[l][None] for l in range(self.num_layers)])
        self._sync()
        plan = state.plan
        return BlendResult(logits, cache, plan.input_ids, state.selected, plan.forced, state.timings,
                           int(plan.probe_rows.numel()))

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
            out = self.forward(torch.tensor([tok]), torch.tensor([pos]), cache)
            cache = out_cache(out)
            logits = out.logits[0, -1].float()
            pos += 1
        result.cache = cache
        if return_logits:
            return tokens, torch.stack(all_logits)
        return tokens
