"""A request as the blend carries it: its :class:`RequestPlan` (step 1: tokens, forced
tokens, where each reused chunk goes, how many tokens each check layer keeps), its
:class:`BlendState` while the layers run (the request's KV buffers and the rows still
computed) and the :class:`BlendResult` it ends with."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import ops
from ..chunk import ChunkKV
from .config import BlendConfig
from .schedule import selection_schedule


@dataclass
class BlendResult:
    """What one blended (or full) prefill returns.

    ``logits`` ``[vocab]`` float32 of the first output token; ``cache`` a ``DynamicCache``
    over all ``N`` request tokens that Hugging Face can continue from (feed the next token
    at position ``N``); ``input_ids`` ``[N]``; ``selected[l]`` the token indices computed
    at layer ``l`` (``None``: all tokens); ``forced`` ``[N]`` bool; ``timings`` in ms;
    ``stats``: what the selection measured (with a probe: ``stale_attention``, the share
    of the probe's attention left on stale reused tokens by the selection, and
    ``reuse_entropy``, the entropy in nats of the first token's distribution that the
    probe's last row computes, over the reused chunk KV and the probe's own rows; with a
    ``target``: ``target_picks``, the count the target asked for before the floor and
    ceiling); ``probe_attention``: with a probe, the probe's attention on the non-forced
    tokens (summed over the layers from the first check layer on, in decreasing order)
    and its total attention, for analysis.
    """

    logits: torch.Tensor
    cache: object
    input_ids: torch.Tensor
    selected: list
    forced: torch.Tensor
    timings: dict = field(default_factory=dict)
    probe_tokens: int = 0
    stats: dict = field(default_factory=dict)
    probe_attention: tuple | None = None

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
    """A request laid out for blending (:meth:`~cacheblend_ext.blend.engine.BlendEngine.plan_request`).

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
        schedule = selection_schedule(planned, n, int(forced.sum()), num_layers, probe.numel())
        return cls(config, torch.cat(ids_parts), forced, chunks, spans,
                   torch.cat(src_pos) if chunks else None, dict(zip(schedule.layers, schedule.picks)),
                   probe[: schedule.probe_rows] if schedule.probe_rows else probe[:0])


@dataclass
class BlendState:
    """Per-request state while the layers run: the request's KV buffers, the hidden states
    of the rows still computed (``sel``: their positions, ``None`` for all) and timings.
    :meth:`start` makes it; :meth:`place_reused` is step 2 of the blend."""

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
    probe_value: torch.Tensor | None = None  # [L, N] (probe_score="value")
    chunk_of: torch.Tensor | None = None  # [N] chunk index of each position, -1 outside chunks (chunk_index)
    stats: dict = field(default_factory=dict)
    batch_kv: tuple | None = None  # in a batched blend: the batch's (K, V) buffers kbuf / vbuf are slices of
    batch_offset: int = 0  # where this request's tokens start in them
    selected: list = field(default_factory=list)
    timings: dict = field(default_factory=lambda: {"concat_ms": 0.0, "select_ms": 0.0})

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
    def start(cls, plan: RequestPlan, decoder, rope, kbuf: torch.Tensor | None = None,
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
        hidden = decoder.embed(plan.input_ids.to(device))  # [N, hidden]
        cos, sin = decoder.rotary_angles(hidden, positions)
        dst = torch.cat([torch.arange(a, b) for a, b in plan.spans]).to(device) if plan.chunks else None
        return cls(plan, rope, kbuf, vbuf, positions, plan.forced.to(device), hidden, cos, sin,
                   plan.src_pos.to(device) if plan.chunks else None, dst)

    def place_reused(self, l: int, reused: Sequence[torch.Tensor]) -> None:
        """Step 2: gather the reused chunks' layer-``l`` KV into the request at their new
        positions (K re-rotated)."""
        t0 = time.perf_counter()
        k_tok, v_tok = self.layer_kv(l)
        ops.fused_kv_concat([c[None] for c in reused], self.src_pos, self.dst_pos, self.dst_pos,
                            self.rope.cos_sin_cache, self.rope.is_neox, [k_tok], [v_tok])
        self.timings["concat_ms"] += (time.perf_counter() - t0) * 1e3
