"""The default at 10% against the published scheme at 15%, which spends more FLOPs than it:
FLOP fractions from this directory's flops.json, fidelity from the committed quality runs
of the same requests (first-token and 16-token KL from full prefill; ratios of means with
paired bootstrap 95% intervals over requests).

    python bench/results/2026-12-05-cpu-flops/equal_flops.py
"""

import json
import os
import statistics

from bench.quality_report import bootstrap_ratio_ci

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)


def load(path):
    with open(os.path.join(RESULTS, path)) as f:
        return json.load(f)


flops = load("2026-12-05-cpu-flops/flops.json")["sets"]
synthetic = {f"s{r['seed']}-{r['index']}": r["runs"] for r in load("2026-12-02-cpu-quality/quality.json")["requests"]}
musique = {r["key"]: r["runs"] for r in load("2026-12-04-cpu-musique/curve.json")["requests"]}
CASES = (("synthetic, 30 requests (seeds 0 and 1, first 15 each)", synthetic),
         ("MuSiQue, 10 held-out questions x 10 passages", musique))

print("| set | default 10%: FLOPs / published 15% | KL 1st, default 10% / published 15% [95%] "
      "| KL 16, default 10% / published 15% [95%] | KL 1st, default 15% / published 15% |")
print("|---|---|---|---|---|")
for name, records in CASES:
    rows = flops[name]["rows"]
    ratio = statistics.mean(r["default@0.1"]["flops"] / r["published"]["flops"] for r in rows)
    runs = [records[r["key"]] for r in rows]
    cells = []
    for metric in ("kl1", "kl16"):
        a = [x["default@0.1"][metric] for x in runs]
        b = [x["published@0.15"][metric] for x in runs]
        lo, hi = bootstrap_ratio_ci(a, b, 2000)
        cells.append(f"{statistics.mean(a) / statistics.mean(b):.2f} [{lo:.2f}, {hi:.2f}]")
    same = statistics.mean(x["default@0.15"]["kl1"] for x in runs) / statistics.mean(x["published@0.15"]["kl1"] for x in runs)
    print(f"| {name} | {ratio:.3f} | {cells[0]} | {cells[1]} | {same:.2f} |")
