"""Selection schemes of the blend engine: each scheme's selection against a plain float64
PyTorch reference on small requests, the compute budget, per-call configs, and the
exactness gates (ratio 1 = full prefill, ratio 0 = full KV reuse) under every scheme."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cacheblend_ext import ops, reference
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.blend.schedule import Schedule, published_cost, selection_schedule

from helpers import assert_logits_close, full_reuse_reference, hf_logits_and_greedy, request_parts, tiny_model

# every selection option, alone (the published scheme with one field changed)
SCHEMES = {
    "published": {},
    "v": {"deviation": "v"},
    "kv": {"deviation": "kv"},
    "impact": {"selection": "impact"},
    "impact-v": {"selection": "impact", "deviation": "v"},
    "probe": {"selection": "probe"},
    "probe-gradual": {"selection": "probe", "check_layers": (1, 2)},
    "probe-check0": {"selection": "probe", "check_layers": (0,)},  # the default's selection
    "per_chunk": {"quota": "per_chunk"},
    "boundary": {"boundary_tokens": 3},
    "check2": {"check_layers": (2,)},
    "gradual": {"check_layers": (1, 2, 3)},
    "fresh": {"fresh_check_kv": True},
}


def scheme_config(name: str, ratio: float, budget: str = "compute") -> BlendConfig:
    return BlendConfig.published(ratio).replace(budget=budget, **SCHEMES[name])


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def request(engine, seed=0, sizes=(19, 26, 13)):
    prefix, chunk_ids, query = request_parts(seed=seed, sizes=sizes)
    chunks = [engine.encode_chunk(c) for c in chunk_ids]
    return prefix, chunk_ids, chunks, query


# ---------------------------------------------------------------------------- the budget


def test_published_schedule_is_the_ratio_rule():
    for n, forced, r in ((100, 9, 0.15), (7, 7, 0.5), (1000, 40, 0.0), (65, 3, 1.0)):
        for budget in ("ratio", "compute"):
            sched = selection_schedule(BlendConfig.published(r).replace(budget=budget), n, forced, 30)
            assert sched.layers == (1,) and sched.picks == (min(n - forced, math.ceil(r * n - 1e-9)),)
            assert sched.probe_rows == 0


@pytest.mark.parametrize("name", ["check2", "gradual", "boundary", "published", "probe", "probe-gradual",
                                  "probe-check0"])
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.15, 0.3, 1.0])
def test_compute_budget_is_spent_not_exceeded(name, ratio):
    """Under the compute budget the schedule's token-layers (probe included) fit in the
    published scheme's and one more selected token would not fit (unless all are selected)."""
    n, forced, num_layers, probe = 400, 21, 12, 8
    cfg = scheme_config(name, ratio)
    sched = selection_schedule(cfg, n, forced, num_layers, probe if cfg.selection == "probe" else 0)
    layers, picks = sched.layers, sched.picks

    def cost(ps):
        bounds = layers[1:] + (num_layers,)
        body = layers[0] * n + sum((b - a) * min(n, forced + k) for k, a, b in zip(ps, layers, bounds))
        return body + sched.probe_rows * num_layers

    budget = published_cost(n, forced, ratio, num_layers)
    assert cost(picks) <= budget
    assert all(a >= b for a, b in zip(picks, picks[1:]))
    if picks[-1] < n - forced and len(layers) == 1 and ratio > 0:  # (ratio 0 selects nothing)
        assert cost((picks[0] + 1,)) > budget
    if cfg.selection == "probe":  # a probe runs exactly when a selection must rank tokens
        assert (sched.probe_rows == probe) == any(0 < k < n - forced for k in picks)
    if ratio == 0.0:
        # nothing selected at the first check layer (layer 1, or 0 where configured): full reuse
        assert layers[0] == min(cfg.check_layers[0], 1) and picks[-1] == 0 and sched.probe_rows == 0
    if ratio == 1.0:
        assert picks == (n - forced,) * len(picks) and sched.probe_rows == 0


def test_ratio_budget_applies_ratios_literally():
    cfg = BlendConfig(recompute_ratio=0.2, check_layers=(1, 2, 3), budget="ratio", selection="deviation")
    assert selection_schedule(cfg, 100, 10, 8) == Schedule((1, 2, 3), (40, 30, 20))
    cfg = BlendConfig(recompute_ratio=0.2, check_layers=(3,), budget="ratio", selection="probe")
    assert selection_schedule(cfg, 100, 10, 8, probe_rows=5) == Schedule((3,), (20,), 5)


# ---------------------------------------------------------------------------- per-call configs


CHANGES = [
    {"recompute_ratio": 0.4}, {"deviation": "v"}, {"deviation": "kv"}, {"selection": "impact"},
    {"selection": "probe", "recompute_ratio": 0.4}, {"selection": "probe", "probe_tokens": 2}, {"quota": "per_chunk"},
    {"boundary_tokens": 4}, {"budget": "ratio", "check_layers": (1, 2)},
    {"check_layers": (2,), "recompute_ratio": 0.4}, {"check_layers": (1, 2, 3), "check_ratios": (0.6, 0.4, 0.2)},
    {"fresh_check_kv": True},
]


# changes from the defaults (probe selection at check layer 0)
DEFAULT_CHANGES = [
    {"recompute_ratio": 0.4}, {"selection": "deviation"}, {"selection": "impact"}, {"probe_tokens": 2},
    {"check_layers": (2,)}, {"quota": "per_chunk"}, {"boundary_tokens": 4}, {"budget": "ratio"},
]
BASES = [("published", BlendConfig.published(0.2).replace(budget="compute"), c) for c in CHANGES] + [
    ("default", BlendConfig(recompute_ratio=0.2), c) for c in DEFAULT_CHANGES]


@pytest.mark.parametrize("base_name,base,change", BASES, ids=lambda x: x if isinstance(x, str) else (
    ",".join(x) if isinstance(x, dict) else ""))
def test_config_per_call_equals_engine_level(llama, base_name, base, change):
    """A field passed per call takes effect exactly as when the engine is built with it,
    and it changes the blend (so the comparison is not vacuous)."""
    cfg = base.replace(**change)
    per_call_engine = BlendEngine(llama, config=base)
    prefix, _, chunks, query = request(per_call_engine, seed=11)
    segments = [prefix, *chunks, query]
    per_call = per_call_engine.blend(segments, config=cfg)
    engine_level = BlendEngine(llama, config=cfg).blend(segments)
    default = per_call_engine.blend(segments)
    assert torch.equal(per_call.logits, engine_level.logits)
    for a, b in zip(per_call.selected, engine_level.selected):
        assert (a is None and b is None) or torch.equal(a, b)
    differs = not torch.equal(per_call.logits, default.logits) or any(
        (a is None) != (b is None) or (a is not None and not torch.equal(a, b))
        for a, b in zip(per_call.selected, default.selected))
    assert differs, f"{change} had no effect"


def test_chunk_prefix_per_engine_and_explicit_context(llama):
    bos = BlendEngine(llama).encode_chunk([5, 6, 7])
    alone = BlendEngine(llama, config=BlendConfig(chunk_prefix="none")).encode_chunk([5, 6, 7])
    after = BlendEngine(llama).encode_chunk([5, 6, 7], context=[1, 9, 9, 4])
    assert bos.positions.tolist() == [1, 2, 3] and bos.prefix_ids == (1,)
    assert alone.positions.tolist() == [0, 1, 2] and alone.prefix_ids == ()
    assert after.positions.tolist() == [4, 5, 6] and after.prefix_ids == (1, 9, 9, 4)
    assert len({bos.key, alone.key, after.key}) == 3
    assert not torch.allclose(bos.kv[1:], after.kv[1:])


# ---------------------------------------------------------------------------- selection vs a reference


def reference_scores(model, engine, prefix, chunk_ids, chunks, query, cfg, layer, probed=False):
    """Float64 scores of every token at the first check layer, from Hugging Face's own
    forward: the layers before it ran in full, so the fresh Q/K/V there are full prefill's."""
    ids = torch.cat([prefix, *chunk_ids, query])
    n = ids.numel()
    with torch.inference_mode():
        hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states[layer][0]
        block = model.model.layers[layer]
        x = block.input_layernorm(hidden)
        attn = block.self_attn
        d = engine.head_dim
        q = attn.q_proj(x).view(n, -1, d).double()
        k = attn.k_proj(x).view(n, -1, d).double()
        v = attn.v_proj(x).view(n, -1, d).double()
    rope = engine.rope(n)
    pos = torch.arange(n)
    q = reference.rope_reposition(q, torch.zeros(n, dtype=torch.long), pos, rope.cos_sin_cache.cpu(), True)
    k = reference.rope_reposition(k, torch.zeros(n, dtype=torch.long), pos, rope.cos_sin_cache.cpu(), True)
    k_reused, v_reused = k.clone(), v.clone()
    start = prefix.numel()
    spans = []
    for c in chunks:
        dst = torch.arange(start, start + c.num_tokens)
        k_reused[dst] = reference.rope_reposition(c.kv[layer, 0].double(), c.positions, dst,
                                                  rope.cos_sin_cache.cpu(), True)
        v_reused[dst] = c.kv[layer, 1].double()
        spans.append((start, start + c.num_tokens))
        start += c.num_tokens
    if probed:
        return probe_mass(model, engine, ids, chunks, spans, cfg.probe_tokens)[layer:].sum(0), spans
    dk = ((k - k_reused) ** 2).sum((1, 2))
    dv = ((v - v_reused) ** 2).sum((1, 2))
    score = {"k": dk, "v": dv, "kv": dk + dv}[cfg.deviation]
    if cfg.selection == "impact":
        query_rows = torch.arange(start, n)
        group = engine.num_heads // engine.num_kv_heads
        keys = k.repeat_interleave(group, dim=1)  # [N, Hq, D]
        logits = torch.einsum("mhd,nhd->mhn", q[query_rows], keys) * engine.scaling
        logits = logits.masked_fill(pos[None, None, :] > query_rows[:, None, None], float("-inf"))
        score = score * logits.softmax(-1).sum((0, 1))
    return score, spans


def probe_mass(model, engine, ids, chunks, spans, probe_tokens):
    """``[L, N]`` float64: the attention the last ``probe_tokens`` tokens pay each position
    at each layer when they alone run over the reused (re-rotated) chunk KV."""
    n = ids.numel()
    rows = torch.arange(n - probe_tokens, n)
    rope = engine.rope(n).cos_sin_cache.cpu()
    zero = torch.zeros(probe_tokens, dtype=torch.long)
    group = engine.num_heads // engine.num_kv_heads
    masses = []
    with torch.inference_mode():
        h = model.model.embed_tokens(ids[rows]).double()
        for l, block in enumerate(model.model.layers):
            block = block.double()
            x = block.input_layernorm(h)
            a = block.self_attn
            q = reference.rope_reposition(a.q_proj(x).view(probe_tokens, -1, engine.head_dim), zero, rows, rope, True)
            k = reference.rope_reposition(a.k_proj(x).view(probe_tokens, -1, engine.head_dim), zero, rows, rope, True)
            v = a.v_proj(x).view(probe_tokens, -1, engine.head_dim)
            keys = torch.zeros(n, engine.num_kv_heads, engine.head_dim, dtype=torch.float64)
            values = torch.zeros_like(keys)
            for c, (s, e) in zip(chunks, spans):
                keys[s:e] = reference.rope_reposition(c.kv[l, 0].double(), c.positions, torch.arange(s, e), rope, True)
                values[s:e] = c.kv[l, 1].double()
            keys[rows], values[rows] = k, v
            known = torch.zeros(n, dtype=torch.bool)  # the chunks' KV and the probe's own rows
            for s, e in spans:
                known[s:e] = True
            known[rows] = True
            logits = torch.einsum("phd,nhd->phn", q, keys.repeat_interleave(group, 1)) * engine.scaling
            logits = logits.masked_fill(torch.arange(n)[None, None, :] > rows[:, None, None], float("-inf"))
            logits = logits.masked_fill(~known[None, None, :], float("-inf"))
            probs = logits.softmax(-1)
            masses.append(probs.sum((0, 1)))
            o = torch.einsum("phn,nhd->phd", probs, values.repeat_interleave(group, 1)).reshape(probe_tokens, -1)
            h = h + a.o_proj(o)
            h = h + block.mlp(block.post_attention_layernorm(h))
            block.float()
    return torch.stack(masses)


def reference_picks(cfg, score, spans, budget):
    """The selection rules written out: boundary tokens first, then the top scores over the
    request (global) or per chunk (shares by largest remainder); ties to lower positions."""
    cand = torch.cat([torch.arange(a, b) for a, b in spans])

    def top(members, k):
        order = sorted(members.tolist(), key=lambda p: (-float(score[p]), p))
        return order[:k]

    first = torch.tensor([p for a, b in spans for p in range(a, min(b, a + cfg.boundary_tokens))], dtype=torch.long)
    if first.numel() >= budget:
        return set(top(first, budget))
    chosen = set(first.tolist())
    rest = torch.tensor([p for p in cand.tolist() if p not in chosen], dtype=torch.long)
    need = budget - len(chosen)
    if cfg.quota == "global":
        return chosen | set(top(rest, need))
    sizes = [sum(1 for p in rest.tolist() if a <= p < b) for a, b in spans]
    exact = [s * need / sum(sizes) for s in sizes]
    quota = [math.floor(e) for e in exact]
    for i in sorted(range(len(spans)), key=lambda i: (-(exact[i] - quota[i]), i))[: need - sum(quota)]:
        quota[i] += 1
    for (a, b), q in zip(spans, quota):
        chosen |= set(top(torch.tensor([p for p in rest.tolist() if a <= p < b], dtype=torch.long), q))
    return chosen


@pytest.mark.parametrize("name", ["published", "v", "kv", "impact", "impact-v", "probe", "per_chunk", "boundary",
                                  "check2"])
@pytest.mark.parametrize("ratio", [0.1, 0.35])
def test_selection_matches_reference(llama, name, ratio):
    cfg = scheme_config(name, ratio)
    engine = BlendEngine(llama, config=cfg)
    prefix, chunk_ids, chunks, query = request(engine, seed=21, sizes=(23, 9, 31, 14))
    result = engine.blend([prefix, *chunks, query])
    plan = engine.plan_request([prefix, *chunks, query])
    (layer, budget), = plan.check.items()
    probed = plan.probe_rows.numel() > 0
    assert probed == (name == "probe" and ratio > 0.3)  # at 10% the tiny request cannot pay for a probe
    score, spans = reference_scores(llama, engine, prefix, chunk_ids, chunks, query, cfg, layer, probed)
    want = reference_picks(cfg, score, spans, budget)
    forced = set(result.forced.nonzero().flatten().tolist())
    got = set(result.selected[layer].tolist()) - forced
    assert len(got) == budget == len(want)
    # float32 engine vs float64 reference: only near-ties may differ
    for p in got ^ want:
        kth = sorted((float(score[q]) for q in want), reverse=False)[0] if want else 0.0
        assert abs(float(score[p]) - kth) <= 1e-4 * max(abs(kth), 1e-12), (p, float(score[p]), kth)


# ---------------------------------------------------------------------------- gates under every scheme


@pytest.mark.parametrize("name", list(SCHEMES))
def test_ratio_one_is_full_prefill_under_every_scheme(name):
    for arch in ("llama", "qwen3"):
        model = tiny_model(arch)
        engine = BlendEngine(model, config=scheme_config(name, 1.0))
        prefix, chunk_ids, chunks, query = request(engine, seed=31)
        ref_logits, ref_tokens = hf_logits_and_greedy(model, torch.cat([prefix, *chunk_ids, query]), steps=8)
        result = engine.blend([prefix, *chunks, query])
        assert_logits_close(result.logits, ref_logits)
        assert engine.generate(result, 8) == ref_tokens


@pytest.mark.parametrize("name", [s for s in SCHEMES if s != "fresh"])
def test_ratio_zero_is_full_reuse_under_every_scheme(name):
    """(``fresh_check_kv`` keeps fresh check-layer KV by design, so it is exempt.)"""
    for arch in ("llama", "qwen3"):
        model = tiny_model(arch)
        engine = BlendEngine(model, config=scheme_config(name, 0.0))
        prefix, _, chunks, query = request(engine, seed=32)
        result = engine.blend([prefix, *chunks, query])
        forced = prefix.numel() + query.numel()
        assert [s.numel() for s in result.selected[1:]] == [forced] * 3
        assert_logits_close(result.logits, full_reuse_reference(engine, prefix, chunks, query))


def test_rank_scores_override_the_deviation(llama):
    engine = BlendEngine(llama, config=BlendConfig(recompute_ratio=0.1))
    prefix, _, chunks, query = request(engine, seed=41)
    n = engine.plan_request([prefix, *chunks, query]).num_tokens
    scores = torch.zeros(n)
    scores[prefix.numel() + 2] = 5.0  # rank two chosen tokens first
    scores[prefix.numel() + 30] = 4.0
    cfg = BlendConfig(recompute_ratio=2 / n - 1e-6, budget="ratio")
    result = engine.blend([prefix, *chunks, query], cfg, rank_scores=scores)
    forced = set(result.forced.nonzero().flatten().tolist())
    assert set(result.selected[1].tolist()) - forced == {prefix.numel() + 2, prefix.numel() + 30}
    with pytest.raises(ValueError, match="rank_scores"):
        engine.blend([prefix, *chunks, query], cfg, rank_scores=torch.zeros(3))


def test_bad_scheme_options_raise(llama):
    for field, value in (("selection", "attention"), ("quota", "chunks"), ("budget", "tokens"),
                         ("boundary_tokens", -1), ("chunk_prefix", "system")):
        with pytest.raises(ValueError, match=field):
            BlendEngine(llama, config=BlendConfig(**{field: value}))


# ---------------------------------------------------------------------------- batched blend


BATCH_CONFIGS = {
    "default": BlendConfig(recompute_ratio=0.2),
    # each request's budget set by its probe: the batch's row counts change after planning
    "adaptive": BlendConfig(target=0.3, ratio_floor=0.05, ratio_ceiling=0.6),
    # stale keys scaled in every selective layer (which then bypass the fused layer step)
    "ape": BlendConfig(recompute_ratio=0.2, reused_logit_scale=0.9),
}


@pytest.mark.parametrize("name", ["default", "published", "gradual", "fresh", "adaptive", "ape"])
def test_blend_batch_equals_single_blends(llama, name, monkeypatch):
    """A ragged batch (different lengths, chunk counts, a query-only request) gives every
    request the selection and the logits of blending it alone, and a cache that decodes
    the same continuation."""
    cfg = BATCH_CONFIGS[name] if name in BATCH_CONFIGS else scheme_config(name, 0.2)
    engine = BlendEngine(llama, config=cfg)
    requests = []
    for seed, sizes in ((50, (19, 26, 13)), (51, (40,)), (52, (7, 65, 30, 11)), (53, ())):
        prefix, chunk_ids, query = request_parts(seed=seed, sizes=sizes)
        context = engine.chunk_context(prefix)
        requests.append([prefix, *[engine.encode_chunk(c, context) for c in chunk_ids], query])
    calls = []
    attend = ops.sparse_query_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("q_indptr") is not None)
        return attend(*args, **kwargs)

    monkeypatch.setattr(ops, "sparse_query_attention", spy)
    batch = engine.blend_batch(requests)
    assert len(batch) == len(requests) and not any(calls)  # the query-only request stays on the full path
    batch = batch[3:] + engine.blend_batch(requests[:3])
    assert any(calls)  # three selective requests: one ragged call per layer
    monkeypatch.undo()
    for segments, got in zip(requests[3:] + requests[:3], batch):
        alone = engine.blend(segments)
        assert torch.equal(got.input_ids, alone.input_ids)
        for a, b in zip(got.selected, alone.selected):
            assert (a is None and b is None) or torch.equal(a, b)
        assert (got.logits - alone.logits).abs().max() <= 1e-5 * alone.logits.abs().max()
        assert got.compute_fraction() == alone.compute_fraction()
        assert engine.generate(got, 6) == engine.generate(alone, 6)
    with pytest.raises(ValueError, match="at least one request"):
        engine.blend_batch([])
