"""Token-layers against FLOPs: the default and the published scheme at 15%, and the default
at 10%, on the quality sets, blends only (no reference prefill). For each request: the compute fraction
(token-layers, what "equal compute" equalises), the FLOP fraction (the same weighted by
matrix FLOPs, attention growing with a row's position) and the mean position of the rows
each scheme computes after its last check layer, as a share of the request's length.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/results/2026-12-05-cpu-flops/flops.py OUT.json
"""

import argparse
import json
import statistics
import sys

import torch

from bench import common
from bench.quality import musique_requests, synthetic_requests, add_arguments
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.blend.models import load_model

SETS = {  # name -> bench quality arguments (the sets of the committed quality results)
    "synthetic, 30 requests (seeds 0 and 1, first 15 each)": ["--seeds", "0,1", "--samples", "15"],
    "MuSiQue, 10 held-out questions x 10 passages": ["--set", "musique", "--questions", "1,4,5,6,10,11,12,15,16,17"],
    "MuSiQue, the same questions x 3 passages": ["--set", "musique", "--questions", "1,4,5,6,10,11,12,15,16,17",
                                                "--passages", "3"],
}
SCHEMES = {"default": BlendConfig(recompute_ratio=0.15), "published": BlendConfig.published(0.15),
           "default@0.1": BlendConfig(recompute_ratio=0.10)}


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    model, tok = load_model(dtype=torch.float32)
    engine = BlendEngine(model, tok)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    report = {"environment": common.environment("cpu"), "sets": {}}
    for set_name, argv in SETS.items():
        args = parser.parse_args(argv)
        requests = musique_requests(args, tok) if args.set == "musique" else synthetic_requests(args, tok)
        rows = []
        for req in requests:
            chunks = engine.encode_chunks(req.texts, context=engine.bos_ids())
            row = {"key": req.key}
            with torch.inference_mode():
                for name, cfg in SCHEMES.items():
                    res = engine.blend([req.prefix, *chunks, req.query], cfg)
                    last = res.selected[-1]
                    row["tokens"] = res.num_tokens
                    row[name] = {"compute": res.compute_fraction(), "flops": res.flop_fraction(model.config),
                                 "mean_position": float(last.double().mean()) / res.num_tokens}
            rows.append(row)
            common.progress(f"{set_name}: {req.key} {json.dumps(row)}")
        summary = {"requests": len(rows), "tokens": statistics.mean(r["tokens"] for r in rows)}
        for name in SCHEMES:
            for metric in ("compute", "flops", "mean_position"):
                summary[f"{name}_{metric}"] = statistics.mean(r[name][metric] for r in rows)
        for name in ("default", "default@0.1"):
            summary[f"flops_{name}_over_published"] = statistics.mean(r[name]["flops"] / r["published"]["flops"]
                                                                      for r in rows)
        report["sets"][set_name] = {"summary": summary, "rows": rows}
        print(set_name, json.dumps(summary, indent=1))
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
