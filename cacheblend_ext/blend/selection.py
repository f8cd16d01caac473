"""Selection schemes (step 5, and the probe pass of step 3): rank a check layer's
candidate tokens by the deviation of their fresh from their reused K/V (``"deviation"``),
by that times the query's attention (``"impact"``), or by the attention a probe of the
last query tokens pays them (``"probe"``, :func:`probe_scores`, with optional
crowding-out-aware or span scores); then keep the top ones, chunk-boundary tokens first,
over the request, per chunk or per chunk by relevance (``quota``). With a ``target``, the
probe also sets the request's budget (:func:`adapt_budget`). See
:class:`~cacheblend_ext.blend.config.BlendConfig` for the options."""

from __future__ import annotations

import time

import torch

from .. import ops
from .config import BlendConfig
from .request import BlendState, RequestPlan
from .schedule import selection_schedule


def run_probe(decoder, states: list, sources: list) -> None:
    """Step 3, the probe pass (``selection="probe"``): each request's probe rows (its last
    query tokens, and with ``probe_prefix`` the prefix's tokens) run through every layer
    over the reused KV alone, as in full KV reuse; ``state.probe_mass[l]``
    is the attention they pay each position at layer ``l``, summed over rows and heads
    (with ``probe_score="value"``, ``state.probe_value[l]`` also weighs it by the norm of
    the position's V in each head). Every layer's reused KV is left placed in the
    request's buffers for the main pass."""
    t0, concat0 = time.perf_counter(), [s.timings["concat_ms"] for s in states]
    rows = [s.plan.probe_rows.to(decoder.device) for s in states]
    hidden = [s.hidden[r] for s, r in zip(states, rows)]
    rotary = [(s.cos[r], s.sin[r]) for s, r in zip(states, rows)]
    group = decoder.num_heads // decoder.num_kv_heads
    visible, counted = [], []
    for state, r in zip(states, rows):
        # only rows after the first chunk's start measure attention (prefix rows see no chunk)
        w = (r >= state.plan.spans[0][0]).float()
        counted.append(None if bool(w.all()) else w)
        # The probe sees the reused KV and its own rows (exact position-causal mask); other
        # tokens without cached KV (the prefix, the start of a long query) have no KV yet.
        known = ~state.forced
        known[r] = True
        visible.append((state.positions[None, :] <= r[:, None]) & known[None, :])  # [P, N]
        unknown = (~known).nonzero().flatten()
        state.kbuf[:, :, unknown] = 0  # masked out, but 0 * NaN would still reach the output
        state.vbuf[:, :, unknown] = 0
        state.probe_mass = torch.zeros(decoder.num_layers, state.plan.num_tokens, device=decoder.device,
                                       dtype=torch.float32)
        if state.plan.config.probe_score == "value":
            state.probe_value = torch.zeros_like(state.probe_mass)
    for l, layer in enumerate(decoder.layers):
        outs = []
        for state, source, r, vis, w, (q, k, v) in zip(states, sources, rows, visible, counted,
                                                        decoder.rows_qkv(layer, hidden, rotary)):
            state.place_reused(l, source.layer(l))
            k_tok, v_tok = state.layer_kv(l)
            k_tok[r], v_tok[r] = k, v
            qg = q.float().view(r.numel(), decoder.num_kv_heads, group, decoder.head_dim)
            scores = torch.einsum("phgd,nhd->phgn", qg, k_tok.float()) * decoder.scaling
            probs = scores.masked_fill(~vis[:, None, None, :], float("-inf")).softmax(-1)
            weighted = probs.sum(0) if w is None else torch.einsum("phgn,p->hgn", probs, w)
            state.probe_mass[l] = probs.sum((0, 1, 2)) if w is None else weighted.sum((0, 1))
            if state.probe_value is not None:
                state.probe_value[l] = torch.einsum("hgn,nh->n", weighted, v_tok.float().norm(dim=-1))
            outs.append(torch.einsum("phgn,nhd->phgd", probs, v_tok.float()).to(q.dtype))
        hidden = decoder.o_proj_mlp(layer, hidden, outs)
    for state, r, h in zip(states, rows, hidden):
        if int(r[-1]) == state.plan.num_tokens - 1:  # the first token's distribution under full reuse
            logp = decoder.logits(h[-1:]).log_softmax(-1)
            state.stats["reuse_entropy"] = -(logp.exp() * logp).sum()
    elapsed = (time.perf_counter() - t0) * 1e3
    for state, c0 in zip(states, concat0):
        # the probe's own time: placing the reused KV is the main pass's work done early
        state.timings["probe_ms"] = elapsed - (state.timings["concat_ms"] - c0)


def select(decoder, state: BlendState, l: int, q, k, v):
    """Step 5, at a check layer: rank the candidates (the rows computed so far that are not
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
            score = probe_scores(state, l)[cand_pos]
        else:
            score = deviation(cfg, k[cand], v[cand], k_tok, v_tok, cand_pos)
        if cfg.selection == "impact" and state.rank_scores is None:
            score = score * query_attention_mass(decoder, state, l, q, k, rows)[cand_pos]
        pick = top_candidates(cfg, plan, score, cand_pos, budget)
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


def probe_scores(state: BlendState, l: int) -> torch.Tensor:
    """``[N]`` float32 probe score of each position for a selection at layer ``l``: the
    probe's attention (``probe_score="value"``: times the V norm; ``"depth"``: weighted by
    depth) summed over the layers from ``l`` on; then the ``span`` and ``crowding`` rules over
    each chunk's neighbourhoods (forced positions count as 0 there)."""
    cfg = state.plan.config
    mass = state.probe_value if state.probe_value is not None else state.probe_mass
    if cfg.probe_score == "depth":
        depth = torch.arange(1, mass.shape[0] + 1, device=mass.device, dtype=mass.dtype) / mass.shape[0]
        score = (mass[l:] * depth[l:, None]).sum(0)
    else:
        score = mass[l:].sum(0)
    if cfg.span > 0 or cfg.crowding > 0:
        chunk = state.chunk_index()
        score = score.masked_fill(chunk < 0, 0.0)
        near = neighbour_max(score, chunk, cfg.crowding_window)
        if cfg.span > 0:
            score = torch.maximum(score, cfg.span * near)
            near = neighbour_max(score, chunk, cfg.crowding_window)
        if cfg.crowding > 0:
            score = torch.where(near > score, score * (1.0 - cfg.crowding), score)
    return score


def neighbour_max(score: torch.Tensor, chunk: torch.Tensor, window: int) -> torch.Tensor:
    """``[N]``: the highest score within ``window`` positions of each position, itself
    excluded, in the same chunk (0 where there is none)."""
    n = score.numel()
    best = torch.zeros_like(score)
    for d in range(1, window + 1):
        if d >= n:
            break
        for a, b in ((slice(d, None), slice(None, n - d)), (slice(None, n - d), slice(d, None))):
            # best[a] sees score[b], the position d away
            same = (chunk[a] == chunk[b]) & (chunk[a] >= 0)
            best[a] = torch.maximum(best[a], torch.where(same, score[b], torch.zeros_like(score[b])))
    return best


def stale_attention(state: BlendState, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the adaptive budget: the probe's attention on the non-forced tokens, summed over
    the layers from ``layer`` on, sorted in decreasing order, and the probe's total
    attention over the same layers (every position, forced ones included)."""
    mass = state.probe_mass[layer:].sum(0)
    return mass[~state.forced].sort(descending=True).values, mass.sum()


def adapt_budget(decoder, state: BlendState) -> None:
    """``target``: after the probe, set the request's kept count at its check layer to the
    fewest tokens that leave at most ``target`` of the probe's attention on stale reused
    tokens, held between the counts of ``ratio_floor`` and ``ratio_ceiling``."""
    cfg, plan = state.plan.config, state.plan
    (layer, _), = plan.check.items()
    ranked, total = stale_attention(state, layer)
    left = ranked.sum() - torch.cat([ranked.new_zeros(1), ranked.cumsum(0)])  # left[k]: stale after k picks
    need = int((left[:-1] > cfg.target * total).sum())
    forced = int(state.forced.sum())
    probe = plan.probe_rows.numel()

    def picks(ratio: float) -> int:
        sched = selection_schedule(cfg.replace(recompute_ratio=ratio, target=None), plan.num_tokens, forced,
                                   decoder.num_layers, probe)
        return sched.picks[-1]

    lo, hi = picks(cfg.ratio_floor), picks(cfg.ratio_ceiling)
    plan.check[layer] = min(max(need, lo), hi)
    state.stats["target_picks"] = need


def deviation(cfg: BlendConfig, k_fresh, v_fresh, k_reused, v_reused, index: torch.Tensor) -> torch.Tensor:
    """``[len(index)]`` squared distance between the fresh and the reused K, V or both
    (``cfg.deviation``) of the candidates, over heads and dims."""
    if cfg.deviation == "k":
        return ops.kv_deviation(k_fresh, k_reused, index)
    if cfg.deviation == "v":
        return ops.kv_deviation(v_fresh, v_reused, index)
    dev = ops.kv_deviation(k_fresh, k_reused, index)
    return ops.kv_deviation(v_fresh, v_reused, index, out=dev, accumulate=True)


def query_attention_mass(decoder, state: BlendState, l: int, q, k, rows) -> torch.Tensor:
    """``[N]`` float32: the attention the query rows (forced rows after the last reused
    chunk) pay each position at this layer, summed over rows and heads; keys are the
    fresh K of the computed rows and the reused K elsewhere."""
    query_start = state.plan.spans[-1][1]
    qrows = (rows >= query_start).nonzero().flatten()
    keys = state.layer_kv(l)[0].clone()
    keys[rows] = k
    group = decoder.num_heads // decoder.num_kv_heads
    qg = q[qrows].float().view(qrows.numel(), decoder.num_kv_heads, group, decoder.head_dim)
    scores = torch.einsum("mhgd,nhd->mhgn", qg, keys.float()) * decoder.scaling
    visible = state.positions[None, :] <= rows[qrows][:, None]  # [m, N] exact causal mask
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return scores.softmax(-1).sum((0, 1, 2))


def top_candidates(cfg: BlendConfig, plan: RequestPlan, score: torch.Tensor, cand_pos: torch.Tensor,
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
    elif cfg.quota == "relevance":
        chosen = rest[relevance_top(score[rest], cand_pos[rest], plan.spans, need, cfg.anchor_tokens)]
    else:
        chosen = rest[per_chunk_top(score[rest], cand_pos[rest], plan.spans, need)]
    return torch.cat([first, chosen])


def per_chunk_top(score: torch.Tensor, pos: torch.Tensor, spans, k: int) -> torch.Tensor:
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


def relevance_top(score: torch.Tensor, pos: torch.Tensor, spans, k: int, anchors: int) -> torch.Tensor:
    """Indices of ``k`` tokens (chunk-anchor probing): each chunk's share proportional to its
    relevance, the summed score of its ``anchors`` highest-scored tokens (largest remainders
    get the leftover, no chunk more than its tokens), the top scores within each chunk."""
    starts = torch.tensor([a for a, _ in spans], device=pos.device)
    chunk = torch.searchsorted(starts, pos, right=True) - 1
    members = [(chunk == i).nonzero().flatten() for i in range(len(spans))]
    sizes = [int(m.numel()) for m in members]
    weight = [float(score[m].topk(min(anchors, m.numel())).values.double().sum()) if m.numel() else 0.0
              for m in members]
    quota = [0] * len(spans)
    open_ = [i for i in range(len(spans)) if sizes[i] > 0]
    left = min(k, sum(sizes))
    while left > 0 and open_:  # water-filling: shares by weight, capped at each chunk's size
        total = sum(weight[i] for i in open_)
        exact = {i: (weight[i] / total if total > 0 else 1.0 / len(open_)) * left for i in open_}
        give = {i: min(int(exact[i]), sizes[i] - quota[i]) for i in open_}
        if sum(give.values()) == 0:  # hand out the remainder one by one, largest remainder first
            for i in sorted(open_, key=lambda i: (-(exact[i] - int(exact[i])), i)):
                if left == 0:
                    break
                if quota[i] < sizes[i]:
                    quota[i] += 1
                    left -= 1
        else:
            for i, g in give.items():
                quota[i] += g
                left -= g
        open_ = [i for i in open_ if quota[i] < sizes[i]]
    picks = [m[ops.select_hkvd(score[m], q)] for m, q in zip(members, quota) if q > 0]
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.int64, device=score.device)
