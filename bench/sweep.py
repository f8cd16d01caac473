"""``bench e2e --sizes``: TTFT / full prefill beside the compute fraction, across request sizes.

Each size is a request of that many tokens: a prefix (BOS + 7 tokens), chunks of
``--chunk-tokens`` random tokens (the last one shorter) and a ``--query-tokens`` query.
At each size, full prefill and CacheBlend at each of ``--ratios`` (default 15 here) are
timed in the same run (round-robin rounds on the CPU); the table gives the median TTFT,
TTFT / full prefill (the median of the per-round ratios on the CPU), the compute fraction
(``BlendResult.compute_fraction``: token-layers computed over a full prefill's, the probe's
included), the gap between the two, the FLOP fraction (``BlendResult.flop_fraction``: the
same weighted by matrix FLOPs, so a computed row's attention grows with its position), the probe's share of the blend and the intra-op
threads the calls ran with (``BlendEngine(cpu_threads="auto")`` by default). The PNG plots
TTFT / full prefill and the fractions against the request size.
"""

from __future__ import annotations

import os
import statistics
import textwrap

from bench import common

DEFAULT_RATIOS = "15"
PREFIX_TOKENS = 8  # BOS + 7


def chunk_sizes(total: int, chunk_tokens: int, query_tokens: int) -> list[int]:
    """Chunk lengths that make a request of ``total`` tokens."""
    rest = total - PREFIX_TOKENS - query_tokens
    if rest < 1:
        raise SystemExit(f"--sizes: {total} tokens leave no room for a chunk after the prefix and the query")
    return [chunk_tokens] * (rest // chunk_tokens) + ([rest % chunk_tokens] if rest % chunk_tokens else [])


def run_sweep(args, engine, config, warmup: int, iters: int) -> dict:
    from bench.e2e import COMMAND, make_request, time_methods

    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--sizes must be comma-separated token counts, got {args.sizes!r}") from None
    ratios_arg = args.ratios if args.ratios != "0,5,10,15,20,30,100" else DEFAULT_RATIOS
    ratios = [float(x) / 100 for x in ratios_arg.split(",") if x.strip()]
    table = common.Table(
        f"TTFT across request sizes, {args.model} on {common.device_name(args.device)} ({args.scheme} scheme, "
        f"chunks of {args.chunk_tokens} tokens, medians of {iters})",
        ["tokens", "method", "TTFT ms", "x full prefill", "compute fraction", "gap", "FLOP fraction", "probe share",
         "threads"])
    rows = []
    for size in sizes:
        common.progress(f"{size} tokens: encoding chunks")
        prefix, chunk_ids, chunks, query = make_request(engine, chunk_sizes(size, args.chunk_tokens, args.query_tokens),
                                                        args.query_tokens, seed=size)
        segments = [prefix, *chunks, query]
        methods = [("full prefill", 1.0, lambda: engine.full_prefill(segments))]
        for r in ratios:
            methods.append((f"CacheBlend {r:.0%}", r, lambda cfg=config(r): engine.blend(segments, cfg)))
        fraction, flops = {}, {}
        for name, _, fn in methods:
            common.progress(f"{size} tokens, {name}: warm-up")
            for _ in range(warmup):
                res = fn()
            fraction[name] = res.compute_fraction() if name != "full prefill" else 1.0
            flops[name] = res.flop_fraction(engine.model.config) if name != "full prefill" else 1.0
        timings = time_methods(methods, args.device, iters)
        full = timings["full prefill"]
        for name, ratio, _ in methods:
            t = timings[name]
            if "samples_ms" in t:  # CPU: the median of the per-round ratios
                vs_full = statistics.median(a / b for a, b in zip(t["samples_ms"], full["samples_ms"]))
            else:
                vs_full = t["median_ms"] / full["median_ms"]
            probe = [x["probe_ms"] / x["total_ms"] for x in t.get("results", []) if "probe_ms" in x]
            share = statistics.median(probe) if probe else 0.0
            used = sorted({x["threads"] for x in t.get("results", []) if "threads" in x})
            row = {"tokens": size, "method": name, "ratio": ratio, **t, "vs_full": vs_full,
                   "compute_fraction": fraction[name], "gap": vs_full - fraction[name], "flop_fraction": flops[name],
                   "probe_share": share, "threads": used}
            rows.append(row)
            table.add(size, name, t["median_ms"], vs_full, fraction[name], vs_full - fraction[name], flops[name], share,
                      ",".join(map(str, used)))
    print(table.render())
    plot = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if plot:
        plot_sweep(rows, table.title, plot)
    return {"command": COMMAND, "sweep": True, "environment": common.environment(args.device),
            "model": args.model, "scheme": args.scheme, "chunk_tokens": args.chunk_tokens,
            "query_tokens": args.query_tokens, "warmup": warmup, "iters": iters, "table": table.as_dict(),
            "rows": rows, "plot": plot}


def plot_sweep(rows: list, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    for i, method in enumerate(sorted({r["method"] for r in rows if r["method"] != "full prefill"})):
        pts = sorted((r["tokens"], r["vs_full"], r["compute_fraction"], r.get("flop_fraction"))
                     for r in rows if r["method"] == method)
        xs = [p[0] for p in pts]
        color = f"C{i}"
        ax.plot(xs, [p[1] for p in pts], "o-", color=color, label=f"{method}: TTFT / full prefill")
        ax.plot(xs, [p[2] for p in pts], "s--", color=color, alpha=0.6, label=f"{method}: compute fraction (token-layers)")
        if all(p[3] is not None for p in pts):  # runs before flop_fraction have none
            ax.plot(xs, [p[3] for p in pts], "^:", color=color, alpha=0.6, label=f"{method}: FLOP fraction")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["tokens"] for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("request tokens")
    ax.set_ylabel("fraction of full prefill")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: clear of the lines
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
