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
:mod:`cacheblend_ext.blend` (the package docstring lists them). Chunk encoding, the
full-prefill baselines and decoding come from its base class
:class:`~cacheblend_ext.blend.prefill.Prefill`.

The reused KV arrives one layer at a time through a *layer source* (the protocol:
:mod:`cacheblend_ext.layer_source`); by default the request's ``ChunkKV`` objects' own
tensors.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Sequence

import torch

from ..chunk import ChunkKV
from ..identity import ModelIdentity
from ..layer_source import LayerSource, MemoryLayerSource
from ..rope import rope_spec_from_config
from ..threads import CoreMonitor, intra_op_threads, threaded
from .attention import attend, changes_attention
from .config import BlendConfig
from .hf import HFDecoder, make_dynamic_cache
from .request import BlendResult, BlendState, RequestPlan, index_batch
from .prefill import Prefill
from .selection import adapt_budget, ranks_without_projections, run_probe, select, stale_attention
from .step import EagerStep, SelectiveRows
from .timing import DEFAULT_SPANS, StepTimer


class BlendEngine(Prefill):
    """CacheBlend over one Hugging Face causal LM (see the module docstring).

    ``cpu_threads`` (on the CPU): ``"auto"`` (default) runs each blend, prefill and decode
    with as many intra-op threads as cores other processes leave free (measured between
    calls, :mod:`cacheblend_ext.threads`; at most torch's thread count when the engine was
    made); an int runs them with that many; None leaves torch's setting alone. A blend's
    many small operators each wait for all their threads, so threads on busy cores cost it
    far more than a full prefill.
    """

    def __init__(self, model, tokenizer=None, config: BlendConfig | None = None, model_id: str | None = None,
                 cpu_threads: int | str | None = "auto"):
        if not (cpu_threads is None or cpu_threads == "auto" or (isinstance(cpu_threads, int) and cpu_threads > 0)):
            raise ValueError(f"cpu_threads must be 'auto', a positive int or None, got {cpu_threads!r}")
        self.cpu_threads, self.max_threads = cpu_threads, torch.get_num_threads()
        self.cores = CoreMonitor() if cpu_threads == "auto" else None
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

    def threads(self):
        """Context: the intra-op threads of one call (``cpu_threads``; nothing on a GPU)."""
        if self.cpu_threads is None or self.device.type != "cpu":
            return intra_op_threads(None)
        n = self.cores.threads(self.max_threads) if self.cpu_threads == "auto" else self.cpu_threads
        return intra_op_threads(n)

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

    # ------------------------------------------------------------------ blend

    @threaded
    @torch.inference_mode()
    def blend(self, segments, config: BlendConfig | None = None, source: LayerSource | None = None,
              rank_scores: torch.Tensor | None = None, step=None, profile: bool = False) -> BlendResult:
        """Blend ``segments`` (``ChunkKV`` reused; text / ids forced) into a prefill.

        ``config`` overrides the engine's :class:`BlendConfig` for this call. ``source``
        overrides where the reused chunks' per-layer KV comes from (see the layer-source
        protocol in :mod:`cacheblend_ext.layer_source`); by default the chunks' own tensors.
        ``rank_scores`` ``[N]``, if given, ranks the candidates at every check layer in
        place of the configured deviation (for experiments with other rankings, such as
        the hindsight yardstick of ``bench quality``). ``step``: how the selective layers
        run, a :class:`~cacheblend_ext.blend.step.CUDAGraphStep` to replay them from CUDA
        graphs (the blend then runs in its KV buffers); eager by default. ``profile``
        times every step (see :class:`BlendResult` for the ``timings``).
        """
        cfg = config or self.config
        cfg.validate(self.num_layers)
        t_start = time.perf_counter()
        timer = StepTimer(self.device, None if profile else DEFAULT_SPANS)
        with timer.span("plan"):
            plan = self.plan_request(segments, cfg)
            shape = (self.num_layers, self.num_kv_heads, plan.num_tokens, self.head_dim)
            state = self._start(plan, timer, *(step.kv_buffers(shape, self.dtype) if step is not None else ()))
            if rank_scores is not None:
                if rank_scores.shape != (plan.num_tokens,):
                    raise ValueError(f"rank_scores must be [{plan.num_tokens}], got {tuple(rank_scores.shape)}")
                state.rank_scores = rank_scores.to(self.device, torch.float32)
        if source is None:
            source = MemoryLayerSource.of_chunks(plan.chunks, self.device, self.dtype)
        try:
            self._run_layers([state], [source], step)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        result = self._finish(state)
        result.timings = {**timer.result(), "total_ms": (time.perf_counter() - t_start) * 1e3,
                          "threads": torch.get_num_threads()}
        return result

    @threaded
    @torch.inference_mode()
    def blend_batch(self, requests: Sequence, config: BlendConfig | None = None) -> list[BlendResult]:
        """Blend several requests in one pass: a ragged batch whose rows share every
        projection and MLP call (one weight read per layer for the whole batch) and, once
        they are all selective, one ``sparse_query_attention`` call over the batch's KV.

        ``requests`` is a list of segment lists as :meth:`blend` takes them (chunk KV in
        memory); ``config`` applies to all. Each request is planned, ranked and selected on
        its own, so each result is the one :meth:`blend` gives it (selections identical,
        logits equal up to the rounding of the larger matrix products). The results' caches
        are views of one KV buffer of the whole batch. Every result's ``timings`` are the
        batch's.
        """
        cfg = config or self.config
        cfg.validate(self.num_layers)
        if not requests:
            raise ValueError("requests must hold at least one request")
        t_start = time.perf_counter()
        timer = StepTimer(self.device, DEFAULT_SPANS)
        plans = [self.plan_request(segments, cfg) for segments in requests]
        total = sum(p.num_tokens for p in plans)
        shape = (self.num_layers, self.num_kv_heads, total, self.head_dim)
        kbig = torch.empty(shape, device=self.device, dtype=self.dtype)
        vbig = torch.empty_like(kbig)
        offsets = [0, *itertools.accumulate(p.num_tokens for p in plans)]
        states = []
        for plan, offset in zip(plans, offsets):  # each request's KV: a slice of the batch buffer (a view)
            n = plan.num_tokens
            state = self._start(plan, timer, kbig[:, :, offset:offset + n], vbig[:, :, offset:offset + n])
            state.batch_kv, state.batch_offset = (kbig, vbig), offset
            states.append(state)
        index_batch(states, self.device)
        self._run_layers(states, [MemoryLayerSource.of_chunks(p.chunks, self.device, self.dtype) for p in plans])
        results = [self._finish(state) for state in states]
        timings = {**timer.result(), "total_ms": (time.perf_counter() - t_start) * 1e3, "batch_size": len(results),
                   "threads": torch.get_num_threads()}
        for result in results:
            result.timings = dict(timings)
        return results

    # -- the blend's steps, in order

    def plan_request(self, segments, config: BlendConfig | None = None) -> RequestPlan:
        """Step 1: lay a request out (:meth:`RequestPlan.lay_out`) once its chunks were
        checked against this model and its text tokenized."""
        cfg = config or self.config
        parts = []
        for i, seg in enumerate(self.segment_list(segments)):
            if isinstance(seg, ChunkKV):
                self.check_chunk(seg, f"segments[{i}]")
                parts.append(seg)
            else:
                parts.append(self.tokenize(seg, f"segments[{i}]"))
        n = sum(p.num_tokens if isinstance(p, ChunkKV) else p.numel() for p in parts)
        if n == 0:
            raise ValueError("empty request")
        self.check_positions(n, f"request of {n} tokens")
        window = getattr(self.model.config, "sliding_window", None)
        if window and getattr(self.model.config, "use_sliding_window", True) and n > window:
            raise ValueError(f"request of {n} tokens exceeds the model's sliding window ({window}); "
                             "sliding-window attention is not supported")
        return RequestPlan.lay_out(cfg, parts, self.num_layers)

    def _start(self, plan: RequestPlan, timer: StepTimer, kbuf: torch.Tensor | None = None,
               vbuf: torch.Tensor | None = None) -> BlendState:
        max_src = int(plan.src_pos.max()) + 1 if plan.chunks else 0
        return BlendState.start(plan, self.decoder, self.rope(max(plan.num_tokens, max_src)), timer, kbuf, vbuf)

    def _run_layers(self, states: list, sources: list, step=None) -> None:
        """The probe (where planned), then every layer for all ``states`` together: their
        rows share the projection and MLP calls; ranking and selection stay per request.
        A check layer whose ranking needs no fresh Q/K/V (the probe's, or none to make)
        selects before the projections. Once every request is selective and past its last
        check layer, each layer is one :func:`~cacheblend_ext.blend.step.selective_layer`
        call through ``step`` (a step runner; :class:`EagerStep` by default)."""
        probed = [s.plan.config.probe_depth(self.num_layers) if s.plan.probe_rows.numel() else 0 for s in states]
        if any(probed):  # the probe places the reused KV of the layers it runs
            run_probe(self.decoder, [s for s, p in zip(states, probed) if p],
                      [src for src, p in zip(sources, probed) if p])
            adapted = [s for s, p in zip(states, probed) if p and s.plan.config.target is not None]
            for state in adapted:  # the probe sets this request's budget (a wait for the device)
                adapt_budget(self.decoder, state)
                state.make_select_args()
            if adapted and states[0].batch_kv is not None:  # the batch's row counts changed
                index_batch(states, self.device)
        rows, timer = None, states[0].timer
        kbig, vbig = states[0].batch_kv or (states[0].kbuf, states[0].vbuf)
        for l, layer in enumerate(self.layers):
            for state, source, placed in zip(states, sources, probed):
                if l >= placed:
                    reused = source.layer(l) if state.plan.chunks else []
                    if state.plan.chunks and (state.sel is not None or l in state.plan.check):
                        state.place_reused(l, reused)
            pending = set()  # requests selecting at this layer from their fresh Q/K/V
            for i, state in enumerate(states):
                if l in state.plan.check:
                    if ranks_without_projections(state, l):  # select first: project the kept rows only
                        select(self.decoder, state, l)
                    else:
                        pending.add(i)
            if rows is None and not pending and all(s.sel is not None and l >= max(s.plan.check)
                                                    and not changes_attention(s.plan.config) for s in states):
                rows, step = SelectiveRows.of_states(states, l), step or EagerStep()
                step.start(self.decoder, rows)
            if rows is not None:
                with timer.span("step"):
                    step.layer(l, kbig[l].transpose(0, 1), vbig[l].transpose(0, 1))
                for state in states:
                    state.selected.append(state.sel)
                continue
            with timer.span("layers", exclusive=True):  # selection is timed on its own
                qkv = self.decoder.rows_qkv(layer, [s.hidden for s in states], [s.rotary() for s in states])
                for i, state in enumerate(states):
                    if i in pending:
                        qkv[i] = select(self.decoder, state, l, *qkv[i])
                outs = attend(self.decoder, states, l, qkv)
                hidden = self.decoder.o_proj_mlp(layer, [s.hidden for s in states], outs)
            for state, h in zip(states, hidden):
                state.hidden = h
        if rows is not None:
            for state, h in zip(states, step.hidden().split(rows.sizes)):
                state.hidden = h

    def _finish(self, state: BlendState) -> BlendResult:
        """First-token logits from the last token; the blended KV as a ``DynamicCache``
        (views). Ends with a device synchronisation; the caller fills ``timings``."""
        with state.timer.span("finish"):
            logits = self.decoder.logits(state.hidden[-1:])
            cache = make_dynamic_cache(self.model, [state.kbuf[l][None] for l in range(self.num_layers)],
                                       [state.vbuf[l][None] for l in range(self.num_layers)])
        self.synchronize()
        plan = state.plan
        probe_attention = None
        if state.probe_mass is not None:  # what the probe saw and what the selection left stale
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
        return BlendResult(logits, cache, plan.input_ids, state.selected, plan.forced, {},
                           probe_tokens=int(plan.probe_rows.numel()),
                           probe_layers=0 if state.probe_mass is None else int(state.probe_mass.shape[0]),
                           stats=stats, probe_attention=probe_attention, probe_positions=plan.probe_rows)
