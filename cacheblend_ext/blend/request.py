"""A request as the blend carries it: its :class:`RequestPlan` (step 1: tokens, forced
tokens, where each reused chunk goes, how many tokens each check layer keeps), its
:class:`BlendState` while the layers run (the request's KV buffers and the rows still
computed) and the :class:`BlendResult` it ends with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import ops
from ..chunk import ChunkKV
from .config import BlendConfig
from .schedule import selection_schedule
from .timing import StepTimer


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` (made on the host) on ``device`` without making the host wait for the device:
    on CUDA an asynchronous copy from pinned memory (a copy from pageable memory, or a
    blocking one, synchronises with the stream)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class BlendResult:
    """What one blended (or full) prefill returns.

    ``logits`` ``[vocab]`` float32 of the first output token; ``cache`` a ``DynamicCache``
    over all ``N`` request tokens that Hugging Face can continue from (feed the next token
    at position ``N``); ``input_ids`` ``[N]``; ``selected[l]`` the token indices computed
    at layer ``l`` (``None``: all tokens); ``forced`` ``[N]`` bool; ``stats``: what the
    selection measured (with a probe: ``stale_attention``, the share of the probe's
    attention left on stale reused tokens by the selection; with a ``target``: ``target_picks``,
    the count the target asked for before the floor and ceiling); ``probe_attention``:
    with a probe, the probe's attention on the non-forced tokens (summed over the layers
    from the first check layer on, in decreasing order) and its total attention, for
    analysis; ``probe_positions`` the positions of the probe's ``probe_tokens`` rows, which
    ran ``probe_layers`` layers.

    ``timings``, in ms (:mod:`cacheblend_ext.blend.timing`: CUDA events on a GPU, host
    clocks on the CPU; in a batch every result carries the batch's):

    - ``total_ms``: host wall-clock time of the call, from planning to the first-token
      logits on the device (the call ends with a device synchronisation): the time to
      first token;
    - ``probe_ms``: the probe pass, without placing the reused KV it leaves in place for
      the main pass (that is in ``concat_ms``);
    - ``concat_ms``: placing the reused chunks' KV into the request, every layer;
    - ``select_ms``: ranking and selection at the check layers;
    - with ``blend(..., profile=True)`` also ``plan_ms`` (planning, buffers, embeddings),
      ``layers_ms`` (the layers up to the last check layer, without concatenation and
      selection), ``step_ms`` (the selective layers after it, without concatenation) and
      ``finish_ms`` (logits and cache);
    - ``threads``: the intra-op threads the call ran with (``BlendEngine(cpu_threads=...)``),
      and ``batch_size`` in a batch.
    """

    logits: torch.Tensor
    cache: object
    input_ids: torch.Tensor
    selected: list
    forced: torch.Tensor
    timings: dict = field(default_factory=dict)
    probe_tokens: int = 0
    probe_layers: int = 0
    stats: dict = field(default_factory=dict)
    probe_attention: tuple | None = None
    probe_positions: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def recomputed_fraction(self, layer: int = -1) -> float:
        """Fraction of the request's tokens computed at ``layer`` (the last by default)."""
        sel = self.selected[layer]
        return 1.0 if sel is None else sel.numel() / self.num_tokens

    def compute_fraction(self) -> float:
        """Token-layers computed (attention and MLP, the probe pass's rows at the layers it
        ran included) over
        ``N * L``: the share of a full prefill's compute this blend spent (a check layer's
        Q/K/V of its rejected candidates is not counted)."""
        n, layers = self.num_tokens, len(self.selected)
        main = sum(n if s is None else s.numel() for s in self.selected)
        return (main + self.probe_tokens * self.probe_layers) / (n * layers)

    def flop_fraction(self, model_config) -> float:
        """:meth:`compute_fraction` weighted by matrix FLOPs, for the model of
        ``model_config`` (a Hugging Face Llama-family config): a computed row costs its
        layer's projections and MLP, the same at every position, plus attention over its
        ``position + 1`` keys, which grows with the position. Two blends with equal
        token-layers can differ here when one computes later rows. Norms, RoPE, the softmax
        and the logits are not counted; the probe's rows count at every layer it ran."""
        row, pair = layer_flops(model_config)
        n = self.num_tokens

        def cost(positions) -> float:  # rows at these positions, one layer
            return positions.numel() * row + pair * float((positions.double() + 1).sum())

        full_layer = n * row + pair * n * (n + 1) / 2
        main = sum(full_layer if s is None else cost(s.cpu()) for s in self.selected)
        probe = 0.0 if self.probe_positions is None else self.probe_layers * cost(self.probe_positions)
        return (main + probe) / (full_layer * len(self.selected))


def layer_flops(model_config) -> tuple[float, float]:
    """``(per row, per attended key)`` matrix FLOPs of one decoder layer of a Llama-family
    model: a row's Q/K/V and output projections and its gated MLP, and QK^T plus PV for
    each key it attends to."""
    c = model_config
    heads, kv_heads, hidden = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    row = 2 * (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * c.intermediate_size)
    return float(row), float(4 * heads * head_dim)


@dataclass
class RequestPlan:
    """A request laid out for blending (:meth:`~cacheblend_ext.blend.engine.BlendEngine.plan_request`).

    ``input_ids`` ``[N]``; ``forced`` ``[N]`` bool (tokens without cached KV, and the last
    token); ``chunks`` the reused chunks in request order, ``spans`` their ``(start, end)``
    positions and ``src_pos`` the positions their K was rotated at (concatenated);
    ``check`` maps each check layer to the number of non-forced tokens it keeps;
    ``probe_rows`` the positions the probe pass runs (empty: no probe). Everything here
    lives on the host: the number of rows every layer computes is known before the
    layers run.
    """

    config: BlendConfig
    input_ids: torch.Tensor
    forced: torch.Tensor
    chunks: list
    spans: list
    src_pos: torch.Tensor | None
    check: dict
    probe_rows: torch.Tensor
    num_forced: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def check_rows(self) -> dict:
        """``{check layer: (rows it ranks, non-forced rows it keeps)}``: the first check
        layer ranks every token, each later one the previous one's selection (every forced
        token stays selected)."""
        out, candidates = {}, self.num_tokens - self.num_forced
        for l in sorted(self.check):
            kept = min(self.check[l], candidates)
            out[l] = (self.num_forced + candidates, kept)
            candidates = kept
        return out

    def layer_rows(self, num_layers: int) -> list[int]:
        """Rows computed at each layer: every token before the first check layer, then what
        the latest check layer kept (every token where it kept them all)."""
        out, rows = [], self.num_tokens
        sizes = self.check_rows()
        for l in range(num_layers):
            if l in sizes:
                rows = self.num_forced + sizes[l][1]
            out.append(rows)
        return out

    @classmethod
    def lay_out(cls, config: BlendConfig, parts: Sequence, num_layers: int) -> "RequestPlan":
        """The plan of a request made of ``parts`` in order: each a reused ``ChunkKV`` or the
        token ids ``[T]`` of a forced segment. The last token is forced; the probe rows are
        the last ``probe_tokens`` forced tokens after the last chunk's start (with
        ``probe_prefix``, after the forced tokens before the first chunk); the check
        layers' counts come from :func:`~cacheblend_ext.blend.schedule.selection_schedule`."""
        ids_parts, forced_parts, chunks, spans, src_pos = [], [], [], [], []
        n = 0
        for part in parts:
            if isinstance(part, ChunkKV):
                t = part.num_tokens
                ids_parts.append(part.token_ids)
                forced_parts.append(torch.zeros(t, dtype=torch.bool))
                chunks.append(part)
                spans.append((n, n + t))
                src_pos.append(part.positions.cpu())
            else:
                t = part.numel()
                ids_parts.append(part)
                forced_parts.append(torch.ones(t, dtype=torch.bool))
            n += t
        forced = torch.cat(forced_parts)
        forced[-1] = True  # the last token gives the first output token
        probe = torch.zeros(0, dtype=torch.int64)
        if chunks and config.selection == "probe":  # the query: forced tokens after the last chunk's start
            probe = forced[spans[-1][0]:].nonzero().flatten()[-config.probe_tokens:] + spans[-1][0]
            if config.probe_prefix:  # and the forced tokens before the first chunk
                probe = torch.cat([forced[:spans[0][0]].nonzero().flatten(), probe])
        # with a target the probe sets the budget later (adapt_budget), within the ceiling's schedule
        planned = config if config.target is None else config.replace(recompute_ratio=config.ratio_ceiling)
        num_forced = int(forced.sum())
        schedule = selection_schedule(planned, n, num_forced, num_layers, probe.numel())
        return cls(config, torch.cat(ids_parts), forced, chunks, spans,
                   torch.cat(src_pos) if chunks else None, dict(zip(schedule.layers, schedule.picks)),
                   probe[: schedule.probe_rows] if schedule.probe_rows else probe[:0], num_forced)


@dataclass
class BlendState:
    """Per-request state while the layers run: the request's KV buffers, the hidden states
    of the rows still computed (``sel``: their positions, ``None`` for all) and timings.
    :meth:`start` makes it, with everything the layer loop needs from the host already on
    the device (``select_args``: each check layer's ``(indptr, k)`` of
    ``select_hkvd_batched``); :meth:`place_reused` is step 2 of the blend. ``timer``
    times the steps (shared by the requests of a batch)."""

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
    select_args: dict = field(default_factory=dict)
    rank_scores: torch.Tensor | None = None
    probe_mass: torch.Tensor | None = None  # [probe layers, N] (probe selection)
    probe_value: torch.Tensor | None = None  # [probe layers, N] (probe_score="value")
    chunk_of: torch.Tensor | None = None  # [N] chunk index of each position, -1 outside chunks (chunk_index)
    stats: dict = field(default_factory=dict)
    batch_kv: tuple | None = None  # in a batched blend: the batch's (K, V) buffers kbuf / vbuf are slices of
    batch_offset: int = 0  # where this request's tokens start in them
    batch_indptr: tuple | None = None  # the batch's q_indptr per layer [L, B + 1] and kv_indptr [B + 1]
    selected: list = field(default_factory=list)
    timer: StepTimer | None = None

    def rows(self) -> torch.Tensor:
        """Positions of the rows computed at the current layer."""
        return self.positions if self.sel is None else self.sel

    def chunk_index(self) -> torch.Tensor:
        """``[N]`` int64 on the device: the index of the reused chunk each position belongs
        to, -1 for positions outside chunks (made once)."""
        if self.chunk_of is None:
            chunk = torch.full((self.plan.num_tokens,), -1, dtype=torch.int64)
            for i, (a, b) in enumerate(self.plan.spans):
                chunk[a:b] = i
            self.chunk_of = chunk.to(self.positions.device)
        return self.chunk_of

    def rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.cos, self.sin) if self.sel is None else (self.cos[self.sel], self.sin[self.sel])

    def layer_kv(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-major ``[N, H_kv, D]`` views of layer ``l``'s K and V."""
        return self.kbuf[l].transpose(0, 1), self.vbuf[l].transpose(0, 1)

    @classmethod
    def start(cls, plan: RequestPlan, decoder, rope, timer: StepTimer, kbuf: torch.Tensor | None = None,
              vbuf: torch.Tensor | None = None) -> "BlendState":
        """Buffers for the request's KV (``kbuf`` / ``vbuf`` if given: views of a batch's
        buffer), the embeddings and the RoPE angles of every position. ``decoder`` is the
        :class:`~cacheblend_ext.blend.hf.HFDecoder`, ``rope`` a RoPE spec covering the
        request's positions and the chunks' cached ones."""
        n, device = plan.num_tokens, decoder.device
        # the request's KV in HF layout [L, H_kv, N, D]; the ops see token-major views
        if kbuf is None:
            kbuf = torch.empty(decoder.num_layers, decoder.num_kv_heads, n, decoder.head_dim, device=device,
                               dtype=decoder.dtype)
            vbuf = torch.empty_like(kbuf)
        positions = torch.arange(n, device=device)
        hidden = decoder.embed(host_to_device(plan.input_ids, device))  # [N, hidden]
        cos, sin = decoder.rotary_angles(hidden, positions)
        dst = host_to_device(torch.cat([torch.arange(a, b) for a, b in plan.spans]), device) if plan.chunks else None
        state = cls(plan, rope, kbuf, vbuf, positions, host_to_device(plan.forced, device), hidden, cos, sin,
                    host_to_device(plan.src_pos, device) if plan.chunks else None, dst, timer=timer)
        state.make_select_args()
        return state

    def make_select_args(self) -> None:
        """``select_args`` from the plan's check layers (again after changing them, as an
        adaptive budget would, before the layers run)."""
        sizes = self.plan.check_rows()
        packed = host_to_device(torch.tensor([[0, rows, kept] for rows, kept in sizes.values()]),
                                self.positions.device)
        self.select_args = {l: (packed[i, :2], packed[i, 2:]) for i, l in enumerate(sizes)}

    def place_reused(self, l: int, reused: Sequence[torch.Tensor]) -> None:
        """Step 2: gather the reused chunks' layer-``l`` KV into the request at their new
        positions (K re-rotated)."""
        with self.timer.span("concat"):
            k_tok, v_tok = self.layer_kv(l)
            ops.fused_kv_concat([c[None] for c in reused], self.src_pos, self.dst_pos, self.dst_pos,
                                self.rope.cos_sin_cache, self.rope.is_neox, [k_tok], [v_tok])


def index_batch(states: list, device) -> None:
    """A batched blend's ragged indexing, set on every state as ``batch_indptr``: the rows
    each request computes at each layer (``q_indptr`` ``[L, B + 1]``, from the plans, so
    known on the host) and where each request's tokens start in the batch buffer
    (``kv_indptr`` ``[B + 1]``). Made again when an adaptive budget changed a plan."""
    num_layers = states[0].kbuf.shape[0]
    offsets = [s.batch_offset for s in states] + [states[-1].batch_offset + states[-1].plan.num_tokens]
    rows = torch.tensor([[0] * num_layers] + [s.plan.layer_rows(num_layers) for s in states]).cumsum(0)
    indptr = host_to_device(torch.cat([rows.T, torch.tensor([offsets])]), device)  # [L + 1, B + 1]
    for state in states:
        state.batch_indptr = (indptr[:-1], indptr[-1])
