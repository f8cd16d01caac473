"""The tables, paired statistics and plot of ``bench quality``: per-scheme summaries against
full prefill and the published scheme, paired comparisons between runs (bootstrap 95%
intervals over requests), and the four-panel fidelity plot."""

from __future__ import annotations

import random

from bench import common


def bootstrap_mean_ci(diffs: list[float], resamples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean of paired differences."""
    if not diffs:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def bootstrap_ratio_ci(a: list[float], b: list[float], resamples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of ``mean(a) / mean(b)`` over paired resamples."""
    rng = random.Random(seed)
    n = len(a)
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        den = sum(b[i] for i in idx)
        ratios.append(sum(a[i] for i in idx) / den if den > 0 else float("inf"))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[min(resamples - 1, int(0.975 * resamples))]


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(records, runs, resamples) -> list[dict]:
    rows = []
    nan = float("nan")
    for name, scheme, r in runs:
        key = f"{name}@{r:g}"
        xs = [rec["runs"][key] for rec in records]
        pub_key = f"published@{r:g}" if r > 0 else key
        pub = [rec["runs"].get(pub_key) for rec in records]
        if scheme.adaptive or any(p is None for p in pub):  # no published run at this budget (--pairs compares)
            pub = [{m: nan for m in ("f1", "agree", "kl1", "kl16")} for _ in records]
        full_f1 = [rec["full_f1"] for rec in records]
        row = {"scheme": name, "budget": r, "adaptive": scheme.adaptive,
               "compute": mean([x["compute"] for x in xs]), "last_layer": mean([x["last_layer"] for x in xs]),
               "flops": mean([x.get("flops", nan) for x in xs])}  # records before flop_fraction: nan
        for metric in ("f1", "em", "agree", "same16", "kl1", "kl16"):
            row[metric] = mean([x.get(metric, nan) for x in xs])
        row["f1_vs_full"] = row["f1"] - mean(full_f1)
        row["f1_vs_full_ci"] = bootstrap_mean_ci([x["f1"] - f for x, f in zip(xs, full_f1)], resamples)
        row["f1_pct_full"] = 100 * row["f1"] / mean(full_f1) if mean(full_f1) > 0 else nan
        lo, hi = bootstrap_ratio_ci([x["f1"] for x in xs], full_f1, resamples)
        row["f1_pct_full_ci"] = (100 * lo, 100 * hi)
        for metric in ("f1", "agree", "kl1", "kl16"):
            row[f"{metric}_vs_published"] = row[metric] - mean([p[metric] for p in pub])
            row[f"{metric}_vs_published_ci"] = bootstrap_mean_ci([x[metric] - p[metric] for x, p in zip(xs, pub)],
                                                                  resamples)
        for metric in ("kl1", "kl16"):
            den = mean([p[metric] for p in pub])
            row[f"{metric}_x_published"] = row[metric] / den if den > 0 else nan
            row[f"{metric}_x_published_ci"] = bootstrap_ratio_ci([x[metric] for x in xs], [p[metric] for p in pub],
                                                                  resamples)
        row["select_share"] = mean([x["select_ms"] / x["blend_ms"] for x in xs])
        row["description"] = scheme.description
        rows.append(row)
    return rows


def pairs(records, spec: str, resamples: int) -> list[dict]:
    """Paired comparisons ``a@x:b@y`` over the requests: differences of the means (agreement,
    computed fraction) and ratios of the means (KL) with bootstrap 95% intervals."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        a, b = item.split(":")
        missing = [k for k in (a, b) if any(k not in rec["runs"] for rec in records)]
        if missing:
            raise SystemExit(f"--pairs {item}: no run {missing[0]} for every request")
        xa = [rec["runs"][a] for rec in records]
        xb = [rec["runs"][b] for rec in records]
        row = {"a": a, "b": b}
        for metric in ("compute", "agree", "same16", "f1"):
            va, vb = [x[metric] for x in xa], [x[metric] for x in xb]
            row[metric] = (mean(va), mean(vb))
            row[f"{metric}_diff_ci"] = bootstrap_mean_ci([p - q for p, q in zip(va, vb)], resamples)
        for metric in ("kl1", "kl16"):
            va, vb = [x[metric] for x in xa], [x[metric] for x in xb]
            row[metric] = (mean(va), mean(vb))
            row[f"{metric}_ratio"] = mean(va) / mean(vb) if mean(vb) > 0 else float("nan")
            row[f"{metric}_ratio_ci"] = bootstrap_ratio_ci(va, vb, resamples)
        out.append(row)
    return out


def pairs_table(pairs):
    table = common.Table("Paired comparisons (a against b; intervals: paired bootstrap 95%)",
                         ["a", "b", "computed a / b", "agree a / b", "a - b [95%]", "KL 1st a / b", "a/b [95%]",
                          "KL 16 a / b", "a/b [95%]"])
    for r in pairs:
        table.add(r["a"], r["b"], f"{r['compute'][0]:.3f} / {r['compute'][1]:.3f}",
                  f"{r['agree'][0]:.3f} / {r['agree'][1]:.3f}", ci(r["agree_diff_ci"]),
                  f"{r['kl1'][0]:.4f} / {r['kl1'][1]:.4f}",
                  f"{r['kl1_ratio']:.3f} [{r['kl1_ratio_ci'][0]:.2f}, {r['kl1_ratio_ci'][1]:.2f}]",
                  f"{r['kl16'][0]:.4f} / {r['kl16'][1]:.4f}",
                  f"{r['kl16_ratio']:.3f} [{r['kl16_ratio_ci'][0]:.2f}, {r['kl16_ratio_ci'][1]:.2f}]")
    return table


def ci(pair) -> str:
    return f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"


def table(rows, num_requests):
    table = common.Table(
        f"Fidelity and F1 at equal compute on {num_requests} requests (bundled model; intervals: paired bootstrap 95%)",
        ["scheme", "budget", "computed", "FLOPs", "last layer", "F1", "F1 % full [95%]", "agree", "agree - pub [95%]",
         "same 16", "KL 1st", "x pub [95%]", "KL 16", "x pub [95%]", "select+probe %"])
    for r in rows:
        budget = f"t={r['budget']:g}" if r.get("adaptive") else f"{r['budget']:.0%}"
        table.add(r["scheme"], budget, r["compute"], r["flops"], r["last_layer"], r["f1"],
                  f"{r['f1_pct_full']:.0f} [{r['f1_pct_full_ci'][0]:.0f}, {r['f1_pct_full_ci'][1]:.0f}]",
                  r["agree"], ci(r["agree_vs_published_ci"]), r["same16"], r["kl1"],
                  f"{r['kl1_x_published']:.3f} [{r['kl1_x_published_ci'][0]:.2f}, {r['kl1_x_published_ci'][1]:.2f}]",
                  r["kl16"],
                  f"{r['kl16_x_published']:.3f} [{r['kl16_x_published_ci'][0]:.2f}, {r['kl16_x_published_ci'][1]:.2f}]",
                  100 * r["select_share"])
    return table


def plot(rows, records, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    reuse = next((r for r in rows if r["scheme"] == "full KV reuse"), None)
    panels = (("agree", "greedy-answer agreement with full prefill"), ("kl1", "KL(full || scheme), first token"),
              ("kl16", "mean KL, first 16 tokens"), ("f1", "F1 vs gold"))
    schemes = []
    for r in rows:
        if r["scheme"] not in schemes and r["scheme"] != "full KV reuse":
            schemes.append(r["scheme"])
    for name in schemes:
        pts = sorted(((r["compute"], r) for r in rows if r["scheme"] == name), key=lambda p: p[0])
        adaptive = any(p[1].get("adaptive") for p in pts)
        single = len(pts) == 1 or reuse is None or adaptive
        style = "o" if len(pts) == 1 else ("s--" if adaptive else "o-")
        for ax, (key, _) in zip(axes, panels):
            xs = [reuse["compute"]] + [p[0] for p in pts] if not single else [p[0] for p in pts]
            ys = [reuse[key]] + [p[1][key] for p in pts] if not single else [p[1][key] for p in pts]
            ax.plot([100 * x for x in xs], ys, style, label=name + (" (target)" if adaptive else ""),
                    ms=4 if len(pts) > 1 else 6)
    full_f1 = mean([r["full_f1"] for r in records])
    for ax, (key, name) in zip(axes, panels):
        ax.axhline({"agree": 1.0, "kl1": 0.0, "kl16": 0.0, "f1": full_f1}[key], color="gray", ls=":",
                   label="full prefill")
        ax.set_xlabel("computed: % of full prefill's token-layers")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
