"""Loading controller arithmetic on given measurements, fitting, and calibration caching."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cacheblend_ext.store.controller import (LoadingController, Measurements, fit_prefill, measure_prefill,
                                       measure_tier_throughput)

# A Mistral-7B-like layer: 8 KV heads x 128 dims, bf16 -> 4 KiB of K+V per token and layer.
KV_BYTES = 2 * 8 * 128 * 2


def controller(a_ms=0.01, b_ms=0.0, r_quality=0.15):
    m = Measurements(prefill_a_ms=a_ms, prefill_b_ms=b_ms, kv_bytes_per_layer_token=KV_BYTES,
                     tier_gbps={"gpu": math.inf, "cpu": 20.0, "disk": 1.0}, num_layers=32)
    return LoadingController(m, r_quality=r_quality)


def test_load_and_recompute_arithmetic():
    c = controller()
    n = 4000
    assert c.recompute_ms(1.0, n) == pytest.approx(40.0)
    assert c.recompute_ms(0.15, n) == pytest.approx(6.0)
    assert c.load_ms("gpu", n) == 0.0
    assert c.load_ms("cpu", n) == pytest.approx(n * KV_BYTES / 20e9 * 1e3)
    assert c.load_ms("disk", n) == pytest.approx(n * KV_BYTES / 1e9 * 1e3)  # 16.4 ms
    assert c.r_load("disk", n) == pytest.approx(16.384 / 40.0)


def test_ratio_is_max_of_quality_and_load():
    c = controller()
    n = 4000
    d = c.choose_ratio(n, "cpu")  # r_load = 0.8192 / 40 = 0.02 < 0.15
    assert d.ratio == pytest.approx(0.15) and d.hidden and d.tier == "cpu"
    assert d.r_load == pytest.approx(0.8192 / 40.0)
    assert "r_quality" in d.reason
    d = c.choose_ratio(n, "disk")  # r_load = 0.41 > 0.15: recompute more, for free
    assert d.ratio == pytest.approx(16.384 / 40.0) and d.hidden
    assert d.recompute_ms_per_layer == pytest.approx(d.load_ms_per_layer)
    assert d.expected_layer_ms == pytest.approx(16.384)
    d = c.choose_ratio(n, "disk", r_quality=0.6)
    assert d.ratio == pytest.approx(0.6) and d.r_quality == 0.6
    d = c.choose_ratio(n, "gpu")
    assert d.ratio == pytest.approx(0.15) and d.r_load == 0.0


def test_ratio_capped_when_load_slower_than_full_prefill():
    c = controller(a_ms=0.002)  # fast compute: disk load 16.4 ms > full prefill 8 ms per layer
    d = c.choose_ratio(4000, "disk")
    assert d.ratio == 1.0 and not d.hidden and d.r_load > 1.0
    assert "cannot be hidden" in d.reason


def test_cheapest_tier_for_a_fixed_ratio():
    c = controller()
    n = 4000
    assert c.choose_tier(n, 0.5).tier == "disk"  # 20 ms recompute hides 16.4 ms disk load
    d = c.choose_tier(n, 0.15)  # 6 ms: disk is not hidden, CPU (0.82 ms) is
    assert d.tier == "cpu" and d.hidden and d.load_ms_per_layer < d.recompute_ms_per_layer
    assert c.choose_tier(n, 0.01).tier == "gpu"  # 0.4 ms: only the GPU tier
    assert c.choose_tier(n, 0.01, tiers=["cpu", "disk"]).tier == "cpu"
    d = c.choose_tier(n, 0.01, tiers=["disk", "cpu"])
    assert not d.hidden and "no tier" in d.reason
    assert c.choose_tier(n).ratio == pytest.approx(0.15)


def test_quadratic_prefill_term():
    m = Measurements(prefill_a_ms=0.001, prefill_b_ms=1e-6, kv_bytes_per_layer_token=KV_BYTES,
                     tier_gbps={"disk": 1.0})
    c = LoadingController(m)
    for n in (500, 8000):
        full = 0.001 * n + 1e-6 * n * n
        assert c.recompute_ms(0.2, n) == pytest.approx(0.2 * full)
        assert c.r_load("disk", n) == pytest.approx(n * KV_BYTES / 1e6 / full)
    # longer inputs make attention dominate: the disk becomes easier to hide
    assert c.r_load("disk", 8000) < c.r_load("disk", 500)


def test_decision_exposes_inputs():
    d = controller().choose_ratio(1000, "disk")
    js = json.loads(json.dumps(d.as_dict()))
    assert js["inputs"]["tier_gbps"] == {"gpu": None, "cpu": 20.0, "disk": 1.0}
    assert js["inputs"]["kv_bytes_per_layer_token"] == KV_BYTES
    assert set(js) >= {"ratio", "tier", "r_quality", "r_load", "recompute_ms_per_layer", "load_ms_per_layer",
                       "hidden", "reason", "expected_layer_ms"}
    m = Measurements.from_dict(js["inputs"])
    assert math.isinf(m.tier_gbps["gpu"]) and m.tier_gbps["disk"] == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="r_quality"):
        controller(r_quality=1.5)
    with pytest.raises(ValueError, match="positive"):
        controller(a_ms=0.0)
    with pytest.raises(ValueError, match="no throughput measured for tier 'nvme'"):
        controller().load_ms("nvme", 10)


def test_fit_prefill():
    a, b = fit_prefill({100: 0.5 * 100 + 2e-3 * 100 ** 2, 400: 0.5 * 400 + 2e-3 * 400 ** 2,
                        1000: 0.5 * 1000 + 2e-3 * 1000 ** 2})
    assert a == pytest.approx(0.5) and b == pytest.approx(2e-3)
    assert fit_prefill({256: 2.56}) == (pytest.approx(0.01), 0.0)
    a, b = fit_prefill({100: 1.0, 200: 1.9})  # sub-linear timings: no negative coefficients
    assert a >= 0 and b >= 0


def test_measure_prefill_with_a_callable():
    calls = []
    a, b, samples = measure_prefill(lambda n: calls.append(n), num_layers=4, sizes=(8, 16), reps=2)
    assert calls.count(8) == 3 and calls.count(16) == 3
    assert set(samples) == {8, 16} and a >= 0 and b >= 0


def test_measure_tier_throughput_runs(tmp_path):
    assert math.isinf(measure_tier_throughput("gpu", "cpu"))
    assert math.isinf(measure_tier_throughput("cpu", "cpu"))
    gbps = measure_tier_throughput("disk", "cpu", torch.float16, disk_dir=tmp_path, num_layers=2, tokens=64,
                                   heads=2, head_dim=16, reps=1)
    assert gbps > 0 and not math.isinf(gbps)
    with pytest.raises(ValueError, match="unknown tier"):
        measure_tier_throughput("tape", "cpu")


def test_calibrate_caches(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                   intermediate_size=64, vocab_size=50, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    c1 = LoadingController.calibrate(model, sizes=(16, 32), cache_dir=tmp_path / "cache", disk_dir=tmp_path,
                                     tiers=("cpu", "disk"))
    assert c1.m.kv_bytes_per_layer_token == 2 * 2 * 8 * 4 and c1.m.num_layers == 2
    assert math.isinf(c1.m.tier_gbps["cpu"]) and c1.m.tier_gbps["disk"] > 0
    files = list((tmp_path / "cache" / "controller").glob("*.json"))
    assert len(files) == 1
    c2 = LoadingController.calibrate(model, sizes=(16, 32), cache_dir=tmp_path / "cache", disk_dir=tmp_path)
    assert c2.m.as_dict() == c1.m.as_dict()  # read back from the cache, not measured again
    d = c2.choose_ratio(1000, "disk")
    assert 0.15 <= d.ratio <= 1.0
