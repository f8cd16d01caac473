"""Tables of this directory's results, as Markdown (run from the repository root:
``python bench/results/2026-12-04-cpu-lean/summarize.py``)."""

from __future__ import annotations

import json
import os
import random
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
OLD_QUALITY = os.path.join(HERE, "..", "2026-12-02-cpu-quality", "quality.json")


def load(name):
    path = os.path.join(HERE, name)
    return json.load(open(path)) if os.path.exists(path) else None


def paired(row, full):
    """Median over rounds of the row's time over full prefill's in the same round."""
    return statistics.median(a / b for a, b in zip(row["samples_ms"], full["samples_ms"]))


def spread(row, full):
    """The per-round ratios' range, as text."""
    xs = [a / b for a, b in zip(row["samples_ms"], full["samples_ms"])]
    return f"{min(xs):.3f}-{max(xs):.3f}"


def load_str(d):
    return "/".join(f"{x:.1f}" for x in d["environment"]["loadavg"])


def e2e_rows(name):
    d = load(name)
    if d is None:
        return None, []
    full = d["rows"][0]
    steps = (d.get("profile") or {}).get("steps", {})
    out = []
    for r in d["rows"]:
        if r["method"].startswith("prefix caching"):
            continue
        st = steps.get(r["method"])
        share = st["probe_ms"] / st["total_ms"] if st else None
        out.append((r["method"], r["median_ms"], paired(r, full), r.get("compute_fraction"), share))
    return d, out


def probe_table():
    print("### Probe cost and TTFT / full prefill (one thread)\n")
    print("| run | tokens | method | TTFT ms (median) | TTFT / full prefill (median per-round ratio) "
          "| compute fraction | gap | probe share | load avg (1/5/15 min, at the end) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("profile_801_default.json", "profile_801_published.json"):
        d, rows = e2e_rows(name)
        if d is None:
            continue
        for method, ms, ratio, cf, share in rows:
            cf_s = f"{cf:.3f}" if cf is not None else ""
            gap = f"{ratio - cf:+.3f}" if cf is not None else ""
            sh = f"{share:.1%}" if share is not None else ""
            print(f"| {name} | {d['tokens']} | {method} | {ms:.0f} | {ratio:.3f} | {cf_s} | {gap} | {sh} | "
                  f"{load_str(d)} |")
    for name in ("sizes_default.json", "sizes_published.json"):
        d = load(name)
        if d is None:
            continue
        for r in d["rows"]:
            if r["tokens"] not in (801, 4000):
                continue
            sh = f"{r['probe_share']:.1%}" if r["method"] != "full prefill" else ""
            print(f"| {name} ({d['scheme']}) | {r['tokens']} | {r['method']} | {r['median_ms']:.0f} | "
                  f"{r['vs_full']:.3f} | {r['compute_fraction']:.3f} | {r['gap']:+.3f} | {sh} | {load_str(d)} |")
    print()
    print("Per-step medians (ms; `blend(profile=True)`) and operations of one blend by kind (ms, torch.profiler):\n")
    names = ["profile_801_default.json", "profile_801_published.json", "profile_4000_default.json",
             "profile_4000_published.json"]
    runs = [(n, load(n)) for n in names]
    runs = [(n, d) for n, d in runs if d is not None]
    cols = [(n, d, m) for n, d in runs for m in d["profile"]["steps"] if m != "full KV reuse"]
    print("| | " + " | ".join(f"{d['tokens']} tok, {n.split('_')[-1][:-5]}" for n, d, m in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for k in ("plan_ms", "probe_ms", "concat_ms", "layers_ms", "select_ms", "step_ms", "finish_ms", "other_ms",
              "total_ms"):
        print(f"| {k[:-3]} | " + " | ".join(f"{d['profile']['steps'][m][k]:.1f}" for n, d, m in cols) + " |")
    for kind in cols[0][1]["profile"]["operations"][cols[0][2]]:
        print(f"| op: {kind} | " + " | ".join(f"{d['profile']['operations'][m][kind]:.0f}" for n, d, m in cols)
              + " |")
    print("| load avg | " + " | ".join(load_str(d) for n, d, m in cols) + " |")
    print()


def threads_table():
    print("### One core kept busy by another process (`--cpu-threads auto` vs `torch`)\n")
    print("| policy | threads used (blend) | full prefill ms | CacheBlend 15% ms | speed-up (median per-round) "
          "| full KV reuse speed-up | load avg |")
    print("|---|---|---|---|---|---|---|")
    for policy in ("auto", "torch"):
        d = load(f"threads_busy_{policy}.json")
        if d is None:
            continue
        rows = {r["method"]: r for r in d["rows"]}
        full, cb, reuse = rows["full prefill"], rows["CacheBlend 15%"], rows["full KV reuse"]
        used = sorted({x.get("threads") for x in cb.get("results", []) if x.get("threads") is not None})
        print(f"| {policy} | {','.join(map(str, used))} | {full['median_ms']:.0f} | {cb['median_ms']:.0f} | "
              f"{1 / paired(cb, full):.2f}x | {1 / paired(reuse, full):.2f}x | {load_str(d)} |")
    print()


def ttft_rows_table(name: str, heading: str):
    """The per-size rows of a sweep-shaped JSON against full prefill of the same size."""
    d = load(name)
    if d is None:
        return
    print(f"### {heading}; load {load_str(d)})\n")
    print("| tokens | method | TTFT ms | TTFT / full prefill | per-round range | compute fraction | gap "
          "| probe share |")
    print("|---|---|---|---|---|---|---|---|")
    full = {}
    for r in d["rows"]:
        if r["method"] == "full prefill":
            full[r["tokens"]] = r
            continue
        print(f"| {r['tokens']} | {r['method']} | {r['median_ms']:.0f} | {r['vs_full']:.3f} | "
              f"{spread(r, full[r['tokens']])} | {r['compute_fraction']:.3f} | "
              f"{r['vs_full'] - r['compute_fraction']:+.3f} | {r['probe_share']:.1%} |")
    print()


def ratio_ci(a, b, resamples=2000, seed=0):
    rng = random.Random(seed)
    n = len(a)
    out = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        out.append(sum(a[i] for i in idx) / sum(b[i] for i in idx))
    out.sort()
    return sum(a) / sum(b), out[int(0.025 * resamples)], out[min(resamples - 1, int(0.975 * resamples))]


def quality_table():
    new = load("quality.json")
    if new is None:
        return
    old = json.load(open(OLD_QUALITY))
    print(f"### Fidelity at 15% ({len(new['requests'])} requests; paired bootstrap 95%, 2000 resamples)\n")
    print("| scheme | run | computed | KL 1st | x published [95%] | KL 16 | x published [95%] | agreement | F1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    key = lambda r: (r["seed"], r["index"])  # noqa: E731
    old_by = {key(r): r for r in old["requests"]}
    same = [old_by.get(key(r)) for r in new["requests"]]
    assert all(o is not None and o["question"] == r["question"] for o, r in zip(same, new["requests"])), \
        "the requests differ from the 2026-12-02 set"
    for label, reqs in (("2026-12-04 (this run)", new["requests"]), ("2026-12-02, same requests", same)):
        schemes = [s for s in reqs[0]["runs"] if s.endswith("@0.15")]
        for s in schemes:
            xs = [r["runs"][s] for r in reqs]
            pub = [r["runs"]["published@0.15"] for r in reqs]
            k1 = ratio_ci([x["kl1"] for x in xs], [p["kl1"] for p in pub])
            k16 = ratio_ci([x["kl16"] for x in xs], [p["kl16"] for p in pub])
            mean = lambda k: statistics.mean(x[k] for x in xs)  # noqa: E731
            print(f"| {s[:-5]} | {label} | {mean('compute'):.3f} | {mean('kl1'):.3f} | "
                  f"{k1[0]:.3f} [{k1[1]:.2f}, {k1[2]:.2f}] | {mean('kl16'):.3f} | "
                  f"{k16[0]:.3f} [{k16[1]:.2f}, {k16[2]:.2f}] | {mean('agree'):.3f} | {mean('f1'):.3f} |")
    # the new default against the old default, request by request
    a = [r["runs"]["default@0.15"]["kl1"] for r in new["requests"]]
    b = [o["runs"]["default@0.15"]["kl1"] for o in same]
    k = ratio_ci(a, b)
    print(f"\nDefault today / default on 2026-12-02, first-token KL on the same requests: {k[0]:.3f} "
          f"[{k[1]:.2f}, {k[2]:.2f}]")
    print()


if __name__ == "__main__":
    probe_table()
    ttft_rows_table("probe_layers.json", "Probe depth, all schemes in one run (`probe_layers.json`")
    threads_table()
    ttft_rows_table("sizes_default.json", "Size sweep (`sizes_default.json`, `sizes_default.png`")
    quality_table()
