"""The fidelity options of :class:`BlendConfig`: probe scores, crowding-out-aware and span
ranking, chunk-anchor quotas, the restricted recompute context, APE-style rescaling of
stale keys and the adaptive ``target`` budget. Each runs, changes the blend, follows its
rule written out in plain PyTorch / Python, and keeps the exactness anchors (ratio 1 is
full prefill; ratio 0 is full KV reuse, except the rescaling, which changes reuse by
design)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cacheblend_ext.blend.attention import restricted_attention
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.blend.selection import neighbour_max, probe_scores, relevance_top

from helpers import assert_logits_close, full_reuse_reference, hf_logits_and_greedy, request_parts, tiny_model

OPTIONS = {
    "probe-value": {"probe_score": "value"},
    "probe-depth": {"probe_score": "depth"},
    "probe-prefix": {"probe_prefix": True},
    "crowding": {"crowding": 0.5, "crowding_window": 2},
    "span": {"span": 0.9, "crowding_window": 4},
    "relevance": {"quota": "relevance", "anchor_tokens": 3},
    "restricted": {"recompute_context": "restricted"},
    "ape": {"reused_logit_scale": 0.8},
}
SIZES = (30, 41, 25, 36)


def config(name: str | None, ratio: float) -> BlendConfig:
    """The probe at check layer 0 (spelled out) with one option set."""
    return BlendConfig(recompute_ratio=ratio, selection="probe", check_layers=(0,), **(OPTIONS[name] if name else {}))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def request(engine, seed=5, sizes=SIZES):
    prefix, chunk_ids, query = request_parts(seed=seed, sizes=sizes)
    return prefix, chunk_ids, [engine.encode_chunk(c) for c in chunk_ids], query


request_ = request  # the name inside fixtures, where ``request`` is pytest's


def same_selection(a, b) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a.selected, b.selected))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_runs_and_changes_the_blend(llama, name):
    engine = BlendEngine(llama)
    prefix, _, chunks, query = request(engine)
    segments = [prefix, *chunks, query]
    assert engine.plan_request(segments, config(name, 0.4)).probe_rows.numel() > 0
    base = engine.blend(segments, config(None, 0.4))
    got = engine.blend(segments, config(name, 0.4))
    assert got.compute_fraction() == base.compute_fraction()  # equal compute
    if name in ("restricted", "ape"):  # same tokens, computed differently
        assert same_selection(got, base)
        assert not torch.allclose(got.logits, base.logits)
    else:
        assert not same_selection(got, base)
    assert 0.0 <= got.stats["stale_attention"] <= 1.0
    if name == "probe-prefix":  # the prefix's rows run in the probe and are charged to it
        assert got.probe_tokens == base.probe_tokens + prefix.numel()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def anchors(request):
    """A model, a request and its two references: full prefill (logits, 6 greedy tokens)
    and full KV reuse (logits)."""
    model = tiny_model(request.param)
    engine = BlendEngine(model)
    prefix, chunk_ids, chunks, query = request_(engine, seed=6)
    logits, tokens = hf_logits_and_greedy(model, torch.cat([prefix, *chunk_ids, query]), steps=6)
    reuse = full_reuse_reference(engine, prefix, chunks, query)
    return engine, [prefix, *chunks, query], logits, tokens, reuse


@pytest.mark.parametrize("name", list(OPTIONS))
def test_ratio_one_is_full_prefill(anchors, name):
    engine, segments, logits, tokens, _ = anchors
    result = engine.blend(segments, config(name, 1.0))
    assert_logits_close(result.logits, logits)
    assert engine.generate(result, 6) == tokens


@pytest.mark.parametrize("name", [n for n in OPTIONS if n != "ape"])
def test_ratio_zero_is_full_reuse(anchors, name):
    engine, segments, _, _, reuse = anchors
    assert_logits_close(engine.blend(segments, config(name, 0.0)).logits, reuse)


# ---------------------------------------------------------------------------- the ranking rules


def chunk_layout(n: int, spans) -> torch.Tensor:
    chunk = torch.full((n,), -1, dtype=torch.int64)
    for i, (a, b) in enumerate(spans):
        chunk[a:b] = i
    return chunk


def reference_neighbour_max(score, chunk, window):
    out = []
    for t in range(len(score)):
        near = [float(score[j]) for j in range(max(0, t - window), min(len(score), t + window + 1))
                if j != t and chunk[j] == chunk[t] and chunk[t] >= 0]
        out.append(max(near, default=0.0))
    return torch.tensor(out)


@pytest.mark.parametrize("window", [1, 2, 5])
def test_neighbour_max_matches_loops(window):
    g = torch.Generator().manual_seed(window)
    spans = [(3, 14), (14, 15), (15, 40)]
    chunk = chunk_layout(45, spans)
    score = torch.rand(45, generator=g)
    assert torch.equal(neighbour_max(score, chunk, window), reference_neighbour_max(score, chunk, window))


@pytest.mark.parametrize("rule", ["crowding", "span", "depth", "value"])
def test_probe_scores_follow_their_rule(rule):
    g = torch.Generator().manual_seed(3)
    layers, n, l = 5, 40, 1
    spans = [(2, 17), (17, 33)]
    chunk = chunk_layout(n, spans)
    mass = torch.rand(layers, n, generator=g)
    value = torch.rand(layers, n, generator=g)
    opts = {"crowding": {"crowding": 0.25, "crowding_window": 3}, "span": {"span": 0.6, "crowding_window": 3},
            "depth": {"probe_score": "depth"}, "value": {"probe_score": "value"}}[rule]
    cfg = BlendConfig(**opts)
    state = SimpleNamespace(plan=SimpleNamespace(config=cfg), probe_mass=mass,
                            probe_value=value if rule == "value" else None, chunk_index=lambda: chunk)
    got = probe_scores(state, l)
    if rule == "depth":
        want = sum(mass[i] * (i + 1) / layers for i in range(l, layers))
    elif rule == "value":
        want = value[l:].sum(0)
    else:
        s = [float(x) if chunk[t] >= 0 else 0.0 for t, x in enumerate(mass[l:].sum(0))]
        near = reference_neighbour_max(torch.tensor(s), chunk, 3)
        if rule == "span":
            s = [max(x, 0.6 * float(m)) for x, m in zip(s, near)]
        else:
            s = [x * 0.75 if float(m) > x else x for x, m in zip(s, near)]
        want = torch.tensor(s)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [0, 1, 7, 30, 55, 58])
def test_relevance_quota_rule(k):
    g = torch.Generator().manual_seed(k)
    spans = [(0, 10), (10, 35), (35, 38), (40, 60)]
    pos = torch.cat([torch.arange(a, b) for a, b in spans])
    score = torch.rand(pos.numel(), generator=g)
    score[pos >= 40] *= 5  # the last chunk is the most relevant
    anchors = 4
    pick = relevance_top(score, pos, spans, k, anchors)
    assert pick.numel() == k == len(set(pick.tolist()))
    weights, counts = [], []
    for a, b in spans:
        inside = ((pos >= a) & (pos < b)).nonzero().flatten()
        mine = [int(i) for i in pick if a <= int(pos[i]) < b]
        counts.append(len(mine))
        weights.append(float(score[inside].topk(min(anchors, inside.numel())).values.sum()))
        # each chunk's picks are its top tokens
        top = set(inside[score[inside].argsort(descending=True)[: len(mine)]].tolist())
        assert set(mine) == top
    sizes = [b - a for a, b in spans]
    # proportional shares, except where a chunk is full: then the others share what is left
    full = [i for i in range(len(spans)) if counts[i] == sizes[i]]
    rest = [i for i in range(len(spans)) if i not in full]
    left = k - sum(counts[i] for i in full)
    total = sum(weights[i] for i in rest)
    for i in rest:
        assert abs(counts[i] - left * weights[i] / total) < len(spans)


# ---------------------------------------------------------------------------- restricted context, rescaling


def test_restricted_attention_matches_a_dense_reference():
    g = torch.Generator().manual_seed(9)
    n, hkv, group, d = 30, 2, 2, 8
    spans = [(3, 12), (12, 21), (21, 26)]
    chunk = chunk_layout(n, spans)
    forced = chunk < 0
    sel = torch.tensor([0, 1, 2, 4, 9, 13, 15, 22, 25, 26, 27, 28, 29])
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    q = torch.randn(sel.numel(), hkv * group, d, generator=g)
    decoder = SimpleNamespace(num_heads=hkv * group, num_kv_heads=hkv, head_dim=d, scaling=d ** -0.5)
    state = SimpleNamespace(layer_kv=lambda l: (k, v), chunk_index=lambda: chunk, sel=sel, forced=forced,
                            positions=torch.arange(n))
    got = restricted_attention(decoder, state, 0, q, block=4)
    fresh = set(sel.tolist()) | set(forced.nonzero().flatten().tolist())
    for i, p in enumerate(sel.tolist()):
        keys = [j for j in range(p + 1)
                if chunk[p] < 0 or j in fresh or chunk[j] == chunk[p]]
        for h in range(hkv * group):
            kh = k[keys, h // group].double()
            w = (kh @ q[i, h].double() * d ** -0.5).softmax(0)
            want = (w[:, None] * v[keys, h // group].double()).sum(0)
            assert torch.allclose(got[i, h].double(), want, atol=1e-5), (p, h)


def test_restricted_context_with_one_chunk_changes_nothing(llama):
    engine = BlendEngine(llama)
    prefix, _, chunks, query = request(engine, sizes=(80,))
    segments = [prefix, *chunks, query]
    base = engine.blend(segments, config(None, 0.3))
    got = engine.blend(segments, config("restricted", 0.3))
    assert same_selection(got, base)
    assert_logits_close(got.logits, base.logits, tol=1e-5)


def test_reused_logit_scale_scales_the_stale_keys(llama):
    engine = BlendEngine(llama)
    prefix, _, chunks, query = request(engine)
    segments = [prefix, *chunks, query]
    base = engine.blend(segments, config(None, 0.3))
    got = engine.blend(segments, config("ape", 0.3))
    assert same_selection(got, base)
    n = base.num_tokens
    for l, (a, b) in enumerate(zip(base.cache.layers, got.cache.layers)):
        stale = ~base.forced
        stale[base.selected[l]] = False
        ka, kb = a.keys[0].transpose(0, 1), b.keys[0].transpose(0, 1)  # [N, H, D]
        want = ka[stale] * (0.8 if l > 0 else 1.0)
        assert torch.allclose(kb[stale], want, rtol=1e-6, atol=1e-7), l
        assert torch.equal(a.values[0], b.values[0]) if l == 0 else True
    assert n == got.num_tokens


# ---------------------------------------------------------------------------- adaptive budget


def test_target_chooses_the_budget_within_floor_and_ceiling(llama):
    engine = BlendEngine(llama)
    prefix, _, chunks, query = request(engine)
    segments = [prefix, *chunks, query]
    counts, stale = [], []
    for target in (0.9, 0.6, 0.4, 0.2, 0.05):
        cfg = BlendConfig(target=target, ratio_floor=0.1, ratio_ceiling=0.7)
        res = engine.blend(segments, cfg)
        kept = res.selected[0].numel() - int(res.forced.sum())
        lo = engine.plan_request(segments, BlendConfig(recompute_ratio=0.1)).check[0]
        hi = engine.plan_request(segments, BlendConfig(recompute_ratio=0.7)).check[0]
        assert lo <= kept <= hi
        assert kept == min(max(res.stats["target_picks"], lo), hi)
        if lo < res.stats["target_picks"] < hi:  # not clipped: the target holds, one fewer token would not
            assert res.stats["stale_attention"] <= target + 1e-6
        counts.append(kept)
        stale.append(res.stats["stale_attention"])
    assert counts == sorted(counts) and counts[0] < counts[-1]  # a lower target recomputes more
    assert stale == sorted(stale, reverse=True)


def test_target_extremes_are_the_anchors():
    model = tiny_model("llama")
    engine = BlendEngine(model)
    prefix, chunk_ids, chunks, query = request(engine, seed=8)
    segments = [prefix, *chunks, query]
    ref_logits, _ = hf_logits_and_greedy(model, torch.cat([prefix, *chunk_ids, query]), steps=1)
    everything = BlendConfig(target=0.0, ratio_floor=0.0, ratio_ceiling=1.0, budget="ratio")
    assert_logits_close(engine.blend(segments, everything).logits, ref_logits)
    nothing = BlendConfig(target=1.0, ratio_floor=0.0, ratio_ceiling=1.0, budget="ratio")
    assert_logits_close(engine.blend(segments, nothing).logits, full_reuse_reference(engine, prefix, chunks, query))


def test_bad_fidelity_options_raise(llama):
    bad = [({"target": 1.5}, "target"), ({"target": -0.1}, "target"), ({"target": "high"}, "target"),
           ({"target": 0.2, "selection": "deviation"}, "target"), ({"target": 0.2, "check_layers": (0, 3)}, "target"),
           ({"ratio_floor": -0.1}, "ratio_floor"), ({"ratio_ceiling": 2.0}, "ratio_ceiling"),
           ({"ratio_floor": 0.5, "ratio_ceiling": 0.2}, "ratio_floor"), ({"crowding": 1.5}, "crowding"),
           ({"span": -1.0}, "span"), ({"crowding_window": 0}, "crowding_window"), ({"anchor_tokens": 0}, "anchor_tokens"),
           ({"probe_score": "max"}, "probe_score"), ({"recompute_context": "local"}, "recompute_context"),
           ({"reused_logit_scale": 0.0}, "reused_logit_scale"), ({"quota": "chunk"}, "quota"),
           ({"probe_prefix": 1}, "probe_prefix")]
    for changes, name in bad:
        with pytest.raises(ValueError, match=name):
            BlendEngine(llama, config=BlendConfig(**changes))


def test_published_scheme_keeps_every_option_off():
    pub = BlendConfig.published(0.2)
    assert (pub.probe_score, pub.crowding, pub.span, pub.recompute_context, pub.reused_logit_scale, pub.target) == (
        "attention", 0.0, 0.0, "full", 1.0, None)
