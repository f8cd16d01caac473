"""Where the default's attention time goes at 4,000 tokens: the rows each scheme computes
after its check layers, their mean position, and the time of the sparse-query attention
calls of one blend (every call, one per layer whose rows are selected) (the request of `profile_4000_*.json`: 8 x 495-token chunks, a
32-token query; one thread).

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/results/2026-12-05-cpu-flops/attention_rows.py
"""

import statistics
import time

import torch

import cacheblend_ext.blend.step as step
from bench.e2e import make_request
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.blend.models import load_model

torch.set_num_threads(1)
model, tok = load_model(dtype=torch.float32)
engine = BlendEngine(model, tok, cpu_threads=1)
calls = []
attention = step.ops.sparse_query_attention


def timed(q, k, v, q_pos, scale, **kw):
    t = time.perf_counter()
    out = attention(q, k, v, q_pos, scale, **kw)
    calls.append((q_pos, time.perf_counter() - t))
    return out


step.ops.sparse_query_attention = timed  # the ops module: every caller's calls
with torch.inference_mode():
    prefix, _, chunks, query = make_request(engine, [495] * 8, 32)
    segments = [prefix, *chunks, query]
    for name, cfg in (("default", BlendConfig(recompute_ratio=0.15)), ("published", BlendConfig.published(0.15))):
        engine.blend(segments, cfg)  # warm-up
        totals = []
        for _ in range(3):
            calls.clear()
            res = engine.blend(segments, cfg)
            totals.append(sum(dt for _, dt in calls))
        q_pos = calls[0][0]
        pairs = float((q_pos.double() + 1).sum())
        print(f"{name}: {len(calls)} sparse-query attention calls, {q_pos.numel()} rows each, mean position "
              f"{q_pos.double().mean() / res.num_tokens:.2f} of {res.num_tokens} tokens, "
              f"{pairs / 1e6:.2f} M (row, key) pairs per head and layer; attention "
              f"{statistics.median(totals) * 1e3:.0f} ms per blend (median of 3), "
              f"{statistics.median(totals) / len(calls) * 1e3:.1f} ms per layer; "
              f"compute fraction {res.compute_fraction():.3f}, FLOP fraction {res.flop_fraction(model.config):.3f}")
