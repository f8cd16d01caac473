"""The CPU sparse-query attention op against SDPA's causal CPU kernel, one thread, fp32, the
bundled model's heads (9 query / 3 KV, D = 64) at 4,000 keys: useful GFLOP/s (4 * D FLOPs
per visible (row, key) pair and query head), medians of 5 calls.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/results/2026-12-05-cpu-flops/attention_cpu.py
"""

import statistics
import time

import torch
import torch.nn.functional as F

from cacheblend_ext import ops

torch.set_num_threads(1)
torch.manual_seed(0)
N, HQ, HKV, D = 4000, 9, 3, 64
k, v = torch.randn(N, HKV, D), torch.randn(N, HKV, D)


def median_s(fn, n=5):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def report(name, seconds, pairs):
    print(f"{name:55s} {seconds * 1e3:8.1f} ms {4 * D * HQ * pairs / seconds / 1e9:6.1f} GFLOP/s")


for name, pos in (("640 rows, uniform positions", torch.randperm(N)[:640].sort().values),
                  ("744 rows, in the last half", (N - 1 - torch.randperm(N // 2)[:744]).sort().values),
                  ("all 4,000 rows", torch.arange(N))):
    q = torch.randn(pos.numel(), HQ, D)
    report(f"cacheblend sparse_query_attention, {name}", median_s(lambda: ops.sparse_query_attention(q, k, v, pos, 0.125)),
           float((pos.double() + 1).sum()))
qf = torch.randn(1, HQ, N, D)
kf, vf = k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous()
report("SDPA causal, all 4,000 rows", median_s(lambda: F.scaled_dot_product_attention(qf, kf, vf, is_causal=True,
                                                                                      enable_gqa=True)), N * (N + 1) / 2)
