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
   so that the request fits the compute budget (:mod:`cacheblend_ext.blend.schedule`).
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

The engine runs the steps in order; each one is written in its own module of
:mod:`cacheblend_ext.blend` (the package docstring lists them).

The reused KV arrives one layer at a time through a *layer source* (the protocol:
:mod:`cacheblend_ext.layer_source`); by default the request's ``ChunkKV`` objects' own
tensors.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from ..chunk import ChunkKV
from ..identity import ModelIdentity
from ..layer_source import LayerSource, MemoryLayerSource
from ..rope import rope_spec_from_config
from .attention import attend
from .config import BlendConfig
from .hf import HFDecoder, cache_layers, make_dynamic_cache, out_cache
from .request import BlendResult, BlendState, RequestPlan
from .selection import adapt_budget, run_probe, select, stale_attention


class BlendEngine:
    """CacheBlend over one Hugging Face causal LM (see the module docstring)."""

    def __init__(self, model, tokenizer=None, config: BlendConfig | None = None, model_id: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or BlendConfig()
        self.decoder = d = HFDecoder(model)  # refuses models the engine cannot run
        # the model's shape, as the engine's callers read it
        self.base, self.layers, self.num_layers = d.base, d.layers, d.num_layers
        self.head_dim, self.num_heads, self.num_kv_heads = d.head_dim, d.num_heads, d.num_kv_heads
        self.scaling, self.has_qk_norm = d.scaling, d.has_qk_norm
        self.config.validate(self.num_layers)
        self._rope = None
        # what chunk keys hash: weights, config and RoPE (``model_id`` overrides the model part)
        self.identity = ModelIdentity.of_model(model, model_id=model_id, head_dim=self.head_dim)
        self.model_id = self.identity.model_id

    # ------------------------------------------------------------------ setup

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

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
        return self.decoder.forward(input_ids, position_ids, cache, logits_to_keep)

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

    def plan_request(self, segments, config: BlendConfig | None = None) -> RequestPlan:
        """Step 1: lay a request out (:meth:`RequestPlan.lay_out`) once its chunks were
        checked against this model and its text tokenized."""
        cfg = config or self.config
        parts = []
        for i, seg in enumerate(segments):
            if isinstance(seg, ChunkKV):
                self._check_chunk(seg, f"segments[{i}]")
                parts.append(seg)
            else:
                parts.append(self.tokenize(seg))
        n = sum(p.num_tokens if isinstance(p, ChunkKV) else p.numel() for p in parts)
        if n == 0:
            raise ValueError("empty request")
        self._check_positions(n, f"request of {n} tokens")
        window = getattr(self.model.config, "sliding_window", None)
        if window and getattr(self.model.config, "use_sliding_window", True) and n > window:
            raise ValueError(f"request of {n} tokens exceeds the model's sliding window ({window}); "
                             "sliding-window attention is not supported")
        return RequestPlan.lay_out(cfg, parts, self.num_layers)

    def _start(self, plan: RequestPlan, kbuf: torch.Tensor | None = None,
               vbuf: torch.Tensor | None = None) -> BlendState:
        max_src = int(plan.src_pos.max()) + 1 if plan.chunks else 0
        return BlendState.start(plan, self.decoder, self.rope(max(plan.num_tokens, max_src)), kbuf, vbuf)

    def _run_layers(self, states: list, sources: list) -> None:
        """The probe (where planned), then every layer for all ``states`` together: their
        rows share the projection and MLP calls; ranking and selection stay per request."""
        probed = [s.plan.probe_rows.numel() > 0 for s in states]
        if any(probed):  # the probe reads every layer's reused KV and leaves it in place
            run_probe(self.decoder, [s for s, p in zip(states, probed) if p],
                      [src for src, p in zip(sources, probed) if p])
            for state, p in zip(states, probed):
                if p and state.plan.config.target is not None:  # the probe sets this request's budget
                    adapt_budget(self.decoder, state)
        for l, layer in enumerate(self.layers):
            for state, source, placed in zip(states, sources, probed):
                if not placed:
                    reused = source.layer(l) if state.plan.chunks else []
                    if state.plan.chunks and (state.sel is not None or l in state.plan.check):
                        state.place_reused(l, reused)
            qkv = self.decoder.rows_qkv(layer, [s.hidden for s in states], [s.rotary() for s in states])
            for i, state in enumerate(states):
                if l in state.plan.check:
                    qkv[i] = select(self.decoder, state, l, *qkv[i])
            outs = attend(self.decoder, states, l, qkv)
            hidden = self.decoder.o_proj_mlp(layer, [s.hidden for s in states], outs)
            for state, h in zip(states, hidden):
                state.hidden = h

    def _finish(self, state: BlendState) -> BlendResult:
        """First-token logits from the last token; the blended KV as a ``DynamicCache`` (views)."""
        logits = self.decoder.logits(state.hidden[-1:])
        cache = make_dynamic_cache(self.model, [state.kbuf[l][None] for l in range(self.num_layers)],
                                   [state.vbuf[l][None] for l in range(self.num_layers)])
        self._sync()
        plan = state.plan
        probe_attention = None
        if state.probe_mass is not None:
            layer = min(plan.check)
            probe_attention = tuple(t.cpu() for t in stale_attention(state, layer))
            mass = state.probe_mass[layer:].sum(0)
            stale = ~state.forced
            if state.selected[layer] is not None:
                stale[state.selected[layer]] = False
            else:
                stale[:] = False
            state.stats["stale_attention"] = float(mass[stale].sum() / mass.sum())
        stats = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in state.stats.items()}
        return BlendResult(logits, cache, plan.input_ids, state.selected, plan.forced, state.timings,
                           int(plan.probe_rows.numel()), stats, probe_attention)

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
        tokens, all_logits, result.cache = self.decoder.greedy(result.logits, result.cache, result.num_tokens,
                                                               max_new_tokens, eos if stop_at_eos else ())
        if return_logits:
            return tokens, torch.stack(all_logits)
        return tokens
