"""The probe's depth (``BlendConfig.probe_layers``): which layers it runs, what it is charged,
and that the main pass places the reused KV of the layers it did not run."""

from __future__ import annotations

import pytest
import torch

from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.blend.schedule import published_cost, selection_schedule
from helpers import request_parts, tiny_model



@pytest.fixture(scope="module")
def engine():
    return BlendEngine(tiny_model("llama"), None)


def request(engine, seed=6):
    prefix, chunk_ids, query = request_parts(seed=seed)
    return [prefix, *[engine.encode_chunk(c) for c in chunk_ids], query]


class Recording:
    """A layer source over chunks in memory that records the layers asked for."""

    def __init__(self, chunks):
        self.chunks, self.calls = chunks, []

    def layer(self, l):
        self.calls.append(l)
        return [c.kv[l].clone() for c in self.chunks]


def probe_mass_of(engine, seg, cfg):
    seen = {}
    from cacheblend_ext.blend import selection

    original = selection.select_rows

    def spy(decoder, state, l, q, k, v):
        seen["mass"] = state.probe_mass.clone()
        return original(decoder, state, l, q, k, v)

    selection.select_rows = spy
    try:
        res = engine.blend(seg, cfg)
    finally:
        selection.select_rows = original
    return res, seen["mass"]


@pytest.mark.parametrize("depth", [1, 2, 4, 9])
def test_probe_runs_its_layers_and_is_charged_for_them(engine, depth):
    seg = request(engine)
    cfg = BlendConfig(recompute_ratio=0.3, probe_layers=depth)
    full_depth, full_mass = probe_mass_of(engine, seg, BlendConfig(recompute_ratio=0.3))
    res, mass = probe_mass_of(engine, seg, cfg)
    ran = min(depth, engine.num_layers)
    assert mass.shape[0] == ran and res.probe_layers == ran and full_depth.probe_layers == engine.num_layers
    torch.testing.assert_close(mass, full_mass[:ran])  # the same attention, fewer layers of it
    plan = engine.plan_request(seg, cfg)
    n, forced = plan.num_tokens, plan.num_forced
    kept = sum(n if s is None else s.numel() for s in res.selected)
    assert kept + res.probe_tokens * ran <= published_cost(n, forced, 0.3, engine.num_layers)
    assert res.compute_fraction() == pytest.approx((kept + res.probe_tokens * ran) / (n * engine.num_layers))
    # a shallower probe leaves more of the budget to the selection
    deeper = selection_schedule(BlendConfig(recompute_ratio=0.3), n, forced, engine.num_layers, 8)
    assert selection_schedule(cfg, n, forced, engine.num_layers, 8).picks[0] >= deeper.picks[0]


def test_main_pass_places_the_layers_the_probe_did_not_run(engine):
    seg = request(engine)
    cfg = BlendConfig(recompute_ratio=0.3, probe_layers=2)
    src = Recording(seg[1:-1])
    a = engine.blend(seg, cfg, source=src)
    assert src.calls == list(range(engine.num_layers))  # once each, in order
    b = engine.blend(seg, cfg)
    assert torch.equal(a.logits, b.logits)
    # the reused KV of an unprobed layer is in the result's cache where not recomputed
    plan = engine.plan_request(seg, cfg)
    kept = set(b.selected[3].tolist())
    a0, _ = plan.spans[0]
    pos = next(p for p in range(a0, plan.spans[0][1]) if p not in kept)
    assert torch.equal(b.cache.layers[3].values[0, :, pos], seg[1].kv[3, 1, pos - a0])  # V is placed as stored


def test_probe_layers_validation():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="probe_layers must be a positive int or None"):
            BlendConfig(probe_layers=bad).validate(4)
    with pytest.raises(ValueError, match=r"probe_layers \(2\) must exceed the last check layer \(2\)"):
        BlendConfig(probe_layers=2, check_layers=(0, 2)).validate(4)
    BlendConfig.published().replace(probe_layers=1).validate(4)  # no probe: no constraint
    assert BlendConfig(probe_layers=40).probe_depth(30) == 30 and BlendConfig().probe_depth(30) == 30
