"""Selection schemes (step 5, and the probe pass of step 3): rank a check layer's
candidate tokens by the deviation of their fresh from their reused K/V (``"deviation"``),
by that times the query's attention (``"impact"``), or by the attention a probe of the
last query tokens pays them (``"probe"``, :func:`probe_scores`, with optional
crowding-out-aware or span scores); then keep the top ones, chunk-boundary tokens first,
over the request, per chunk or per chunk by relevance (``quota``). With a ``target``, the
probe also sets the request's budget (:func:`adapt_budget`). See
:class:`~cacheblend_ext.blend.config.BlendConfig` for the options."""

from __future__ import annotations

import torch

from .. import ops
from .config import BlendConfig
from .request import BlendState, RequestPlan, host_to_device
from .schedule import selection_schedule


def run_probe(decoder, states: list, sources: list) -> None:
    """Step 3, the probe pass (``selection="probe"``): each request's probe rows (its last
    query tokens, and with ``probe_prefix`` the prefix's tokens) run through the first
    ``probe_layers`` layers over the reused KV alone, as in full KV reuse;
    ``state.probe_mass[l]`` is the attention the rows after the first chunk's start pay
    each position at layer ``l``, summed over rows and heads (with
    ``probe_score="value"``, ``state.probe_value[l]`` also weighs it by the norm of the
    position's V in each head). The reused KV of those layers is left placed in the
    request's buffers for the main pass."""
    with states[0].timer.span("probe", exclusive=True):  # the reused KV it places counts as concatenation
        probe_pass(decoder, states, sources)


def probe_pass(decoder, states: list, sources: list) -> None:
    rows = [host_to_device(s.plan.probe_rows, decoder.device) for s in states]
    hidden = [s.hidden[r] for s, r in zip(states, rows)]
    rotary = [(s.cos[r], s.sin[r]) for s, r in zip(states, rows)]
    group = decoder.num_heads // decoder.num_kv_heads
    depth = states[0].plan.config.probe_depth(decoder.num_layers)
    bias = []  # per request, [P * group, N]: 0 where a probe row sees a key, -inf elsewhere
    weights = []  # per request, None or [P * group]: 1 for rows that measure attention, 0 for prefix rows
    for state, r in zip(states, rows):
        # only rows after the first chunk's start measure attention (prefix rows see no chunk)
        measured = state.plan.probe_rows >= state.plan.spans[0][0]
        weights.append(None if bool(measured.all()) else
                       host_to_device(measured.float().repeat_interleave(group), decoder.device))
        # The probe sees the reused KV and its own rows (exact position-causal mask); other
        # tokens without cached KV (the prefix, the start of a long query) have no KV yet.
        # Which tokens those are is known on the host, from the plan.
        known = ~state.plan.forced
        known[state.plan.probe_rows] = True
        unknown = host_to_device((~known).nonzero().flatten(), decoder.device)
        visible = (state.positions[None, :] <= r[:, None]) & host_to_device(known, decoder.device)[None, :]
        bias.append(torch.zeros(visible.shape, device=decoder.device).masked_fill_(~visible, float("-inf"))
                    .repeat_interleave(group, 0))
        state.kbuf[:depth].index_fill_(2, unknown, 0)  # masked out, but 0 * NaN would still reach the output
        state.vbuf[:depth].index_fill_(2, unknown, 0)
        state.probe_mass = torch.zeros(depth, state.plan.num_tokens, device=decoder.device, dtype=torch.float32)
        if state.plan.config.probe_score == "value":
            state.probe_value = torch.zeros_like(state.probe_mass)
    hkv, d = decoder.num_kv_heads, decoder.head_dim
    for l, layer in enumerate(decoder.layers[:depth]):
        outs = []
        for state, source, r, b, w, (q, k, v) in zip(states, sources, rows, bias, weights,
                                                     decoder.rows_qkv(layer, hidden, rotary)):
            state.place_reused(l, source.layer(l))
            k_tok, v_tok = state.layer_kv(l)
            k_tok[r], v_tok[r] = k, v
            # per KV head: its group's query heads of every probe row against the layer's keys
            # ([H_kv, N, D] as the buffer holds them; fp32 math)
            qg = q.view(-1, hkv, group, d).transpose(0, 1).reshape(hkv, -1, d).float()
            probs = torch.baddbmm(b, qg, state.kbuf[l].float().transpose(1, 2), alpha=decoder.scaling).softmax(-1)
            per_head = probs.sum(1) if w is None else torch.einsum("hpn,p->hn", probs, w)  # [H_kv, N]
            state.probe_mass[l] = per_head.sum(0)
            if state.probe_value is not None:
                state.probe_value[l] = (per_head * state.vbuf[l].float().norm(dim=-1)).sum(0)
            if l + 1 < depth:  # the last layer's output would feed no other layer
                o = torch.bmm(probs, state.vbuf[l].float())  # [H_kv, P * group, D]
                outs.append(o.view(hkv, -1, group, d).transpose(0, 1).reshape(-1, hkv * group, d).to(q.dtype))
        if l + 1 < depth:
            hidden = decoder.o_proj_mlp(layer, hidden, outs)


def ranks_without_projections(state: BlendState, l: int) -> bool:
    """Whether the selection at check layer ``l`` can run before the layer's projections:
    its ranking reads no fresh Q/K/V (the probe's attention or given scores, or nothing to
    rank: all or none of the candidates kept) and ``fresh_check_kv`` is off."""
    cfg, plan = state.plan.config, state.plan
    if cfg.fresh_check_kv:
        return False
    rows, budget = plan.check_rows()[l]
    if budget in (0, rows - plan.num_forced):
        return True
    return (state.rank_scores is not None or state.probe_mass is not None) and cfg.selection != "impact"


def select(decoder, state: BlendState, l: int, q=None, k=None, v=None):
    """Step 5, at a check layer: rank the candidates (the rows computed so far that are not
    forced) and keep the top ones plus every forced row; returns the kept rows' Q/K/V
    (None before the projections: see :func:`ranks_without_projections`).

    How many rows are kept is known on the host (every forced row plus the layer's
    budget: :meth:`RequestPlan.check_rows`), so the ranking over the whole request
    (``quota="global"``, no boundary tokens) runs without waiting for the device
    (``select_hkvd_batched`` with a fixed output size, its arguments made when the blend
    started); per-chunk quotas and boundary tokens read the candidates back."""
    with state.timer.span("select"):
        return select_rows(decoder, state, l, q, k, v)


def select_rows(decoder, state: BlendState, l: int, q, k, v):
    cfg, plan = state.plan.config, state.plan
    k_tok, v_tok = state.layer_kv(l)
    rows = state.rows()
    rows_forced = state.forced if state.sel is None else state.forced[rows]
    num_rows, budget = plan.check_rows()[l]
    keep = None  # None: every row
    if budget < num_rows - plan.num_forced:
        if budget == 0:
            score = torch.zeros(rows.shape, device=rows.device)
        elif state.rank_scores is not None:
            score = state.rank_scores[rows]
        elif state.probe_mass is not None:  # the probe's attention where this selection takes effect
            score = probe_scores(state, l)[rows]
        else:
            score = deviation(cfg, k, v, k_tok, v_tok, rows)
        if budget and cfg.selection == "impact" and state.rank_scores is None:
            score = score * query_attention_mass(decoder, state, l, q, k, rows)[rows]
        if budget == 0 or (cfg.quota == "global" and not cfg.boundary_tokens):
            indptr, k_dev = state.select_args[l]
            keep = ops.select_hkvd_batched(score.float(), indptr, k_dev, rows_forced, None,
                                           plan.num_forced + budget)[0][0]
        else:
            cand = (~rows_forced).nonzero().flatten()
            pick = top_candidates(cfg, plan, score[cand], rows[cand], budget)
            keep = torch.cat([rows_forced.nonzero().flatten(), cand[pick]]).sort().values
    if cfg.fresh_check_kv:  # after the deviation above has read the reused K/V
        k_tok[rows], v_tok[rows] = k, v
    if keep is not None:  # all kept: stay on the path the rows are on (all tokens: the full path)
        state.sel, state.hidden = rows[keep], state.hidden[keep]
        if q is not None:
            q, k, v = q[keep], k[keep], v[keep]
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
