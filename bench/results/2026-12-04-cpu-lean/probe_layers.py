"""TTFT of the default blend at 15% with the probe over every layer (the shipped default)
and over its first 4 and 8 layers (``BlendConfig.probe_layers``), beside full prefill,
round-robin in one process (bundled model, fp32, one thread). Run from the repository
root: ``OMP_NUM_THREADS=1 PYTHONPATH=. python bench/results/2026-12-04-cpu-lean/probe_layers.py 801,4000 OUT.json``."""

from __future__ import annotations

import json
import statistics
import sys

import torch

from bench import common
from bench.e2e import make_request, time_methods
from bench.sweep import chunk_sizes


def main(sizes: str, out: str, iters: int = 3) -> None:
    from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
    from cacheblend_ext.blend.models import load_model

    model, tok = load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    engine = BlendEngine(model, tok, BlendConfig(), cpu_threads=1)
    configs = {"default (probe: every layer)": BlendConfig(recompute_ratio=0.15),
               "probe_layers=8": BlendConfig(recompute_ratio=0.15, probe_layers=8),
               "probe_layers=4": BlendConfig(recompute_ratio=0.15, probe_layers=4),
               "published": BlendConfig.published(0.15)}
    rows = []
    for size in [int(x) for x in sizes.split(",")]:
        prefix, chunk_ids, chunks, query = make_request(engine, chunk_sizes(size, 512, 32), 32, seed=size)
        segments = [prefix, *chunks, query]
        methods = [("full prefill", 1.0, lambda: engine.full_prefill(segments))]
        methods += [(name, 0.15, lambda cfg=cfg: engine.blend(segments, cfg)) for name, cfg in configs.items()]
        fraction = {}
        for name, _, fn in methods:
            res = fn()  # warm-up
            fraction[name] = res.compute_fraction() if name != "full prefill" else 1.0
        timings = time_methods(methods, "cpu", iters)
        full = timings["full prefill"]
        for name, _, _ in methods:
            t = timings[name]
            vs_full = statistics.median(a / b for a, b in zip(t["samples_ms"], full["samples_ms"]))
            probe = [x["probe_ms"] / x["total_ms"] for x in t["results"] if "probe_ms" in x]
            row = {"tokens": size, "method": name, "median_ms": t["median_ms"], "samples_ms": t["samples_ms"],
                   "vs_full": vs_full, "compute_fraction": fraction[name],
                   "probe_share": statistics.median(probe) if probe else 0.0}
            rows.append(row)
            print(f"{size:5d} {name:30s} {t['median_ms']:8.0f} ms  x full {vs_full:.3f}  compute "
                  f"{fraction[name]:.3f}  probe share {row['probe_share']:.1%}", flush=True)
    result = {"command": "bench/results/2026-12-04-cpu-lean/probe_layers.py", "sizes": sizes, "iters": iters,
              "environment": common.environment("cpu"), "rows": rows}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    with torch.inference_mode():
        main(sys.argv[1], sys.argv[2])
