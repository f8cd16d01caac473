"""``BlendResult.flop_fraction``: token-layers weighted by matrix FLOPs, attention growing
with each computed row's position, checked against a count made row by row."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.blend.request import BlendResult, layer_flops
from helpers import request_parts, tiny_model

CONFIG = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=48,
                         head_dim=16)


def counted(res: BlendResult, config) -> float:
    """The FLOP fraction counted one row at a time, straight from the layer's shapes."""
    hd, h, kv, d = config.head_dim, config.num_attention_heads, config.num_key_value_heads, config.hidden_size

    def row(position: int) -> int:
        projections = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * config.intermediate_size
        return 2 * projections + 4 * h * hd * (position + 1)

    n = res.num_tokens
    full = sum(row(p) for p in range(n)) * len(res.selected)
    spent = sum(sum(row(p) for p in (range(n) if s is None else s.tolist())) for s in res.selected)
    if res.probe_positions is not None:
        spent += res.probe_layers * sum(row(p) for p in res.probe_positions.tolist())
    return spent / full


def result(selected: list, n: int, probe=None, probe_layers=0) -> BlendResult:
    probe_tokens = 0 if probe is None else probe.numel()
    return BlendResult(torch.zeros(3), None, torch.zeros(n, dtype=torch.long), selected, torch.zeros(n, dtype=torch.bool),
                       probe_tokens=probe_tokens, probe_layers=probe_layers, probe_positions=probe)


def test_layer_flops_of_a_llama_layer():
    row, pair = layer_flops(CONFIG)
    assert row == 2 * (32 * 64 + 2 * 32 * 32 + 64 * 32 + 3 * 32 * 48)
    assert pair == 4 * 64
    # without head_dim (older configs) it is hidden_size // heads
    no_head_dim = SimpleNamespace(**{k: v for k, v in vars(CONFIG).items() if k != "head_dim"})
    assert layer_flops(no_head_dim) == layer_flops(SimpleNamespace(**{**vars(CONFIG), "head_dim": 8}))


def test_late_rows_cost_more_than_early_rows_at_equal_token_layers():
    n = 65
    early = result([None, torch.arange(0, 10), torch.arange(0, 10)], n)
    late = result([None, torch.arange(55, 65), torch.arange(55, 65)], n)
    assert early.compute_fraction() == late.compute_fraction()
    assert early.flop_fraction(CONFIG) < early.compute_fraction() < late.flop_fraction(CONFIG)
    for res in (early, late):
        assert res.flop_fraction(CONFIG) == pytest.approx(counted(res, CONFIG), rel=1e-12)
    probed = result([None, torch.tensor([3, 40, 64])], n, probe=torch.tensor([62, 63, 64]), probe_layers=2)
    assert probed.flop_fraction(CONFIG) == pytest.approx(counted(probed, CONFIG), rel=1e-12)
    assert result([None] * 3, n).flop_fraction(CONFIG) == 1.0


def test_flop_fraction_of_real_blends():
    engine = BlendEngine(tiny_model("llama"), None)
    prefix, chunk_ids, query = request_parts(seed=3)
    segments = [prefix, *[engine.encode_chunk(c) for c in chunk_ids], query]
    config = engine.model.config
    assert engine.full_prefill(segments).flop_fraction(config) == 1.0
    for cfg in (BlendConfig(recompute_ratio=0.3), BlendConfig.published(0.3)):
        res = engine.blend(segments, cfg)
        assert 0 < res.flop_fraction(config) < 1
        assert res.flop_fraction(config) == pytest.approx(counted(res, config), rel=1e-12)
    assert engine.blend(segments, BlendConfig(recompute_ratio=0.3)).probe_positions.numel() > 0


def test_bench_size_sweep_reports_both_fractions(monkeypatch, tmp_path, capsys):
    """``bench e2e --sizes`` (a tiny model behind the random-7b name): every row carries the
    compute and FLOP fractions; full prefill's are 1."""
    import bench.e2e as e2e
    from bench.__main__ import main

    monkeypatch.setattr(e2e, "random_7b", lambda device, dtype: tiny_model("mistral").to(device, dtype))
    out = tmp_path / "sizes.json"
    main(["e2e", "--model", "random-7b", "--device", "cpu", "--sizes", "40,90", "--chunk-tokens", "24",
          "--query-tokens", "8", "--warmup", "1", "--iters", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert sorted({r["tokens"] for r in rows}) == [40, 90] and len(rows) == 4
    for r in rows:
        if r["method"] == "full prefill":
            assert r["compute_fraction"] == r["flop_fraction"] == 1.0
        else:
            assert 0 < r["compute_fraction"] < 1 and 0 < r["flop_fraction"] < 1
    assert "FLOP fraction" in capsys.readouterr().out
