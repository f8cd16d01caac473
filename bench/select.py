"""``python -m bench select``: HKVD token selection (KV deviation + top-k).

Three tables, each against eager PyTorch and its ``torch.compile`` version in the same run:
  deviation: ``kv_deviation`` over one layer's K ``[T, H, D]`` (fresh vs reused); bytes =
             both inputs read once + the fp32 output; GB/s, and % of the bandwidth of a
             copy timed in the same rounds (bench/common.py, "% of copy BW").
  selection: the whole check-layer selection from K to sorted indices. cacheblend =
             ``kv_deviation`` + ``select_hkvd_batched`` (2 GPU launches, no host sync); the
             composite = sum of squares, mask, ``torch.topk``, ``torch.cat``, ``torch.sort``.
  top-k only: from a given deviation vector to sorted indices.
On the CPU the implementations are timed round-robin (one call each per round) so that
load from other processes hits them alike. On CUDA a "GPU ops" column counts the kernels and memcpy/memset operations of one call
(torch.profiler).
Default shape: 4096 tokens x 8 KV heads x 128 (Mistral-7B), 15% recompute, the last 32
tokens forced (the query). ``--requests R`` selects for R such requests in one call
(the composite loops over them).
"""

from __future__ import annotations

import math

import torch

from bench import common
from cacheblend_ext import ops

COMMAND = "select"
HELP = "HKVD selection: KV deviation + top-k with forced tokens (one check layer)"


def add_arguments(parser) -> None:
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per request")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim")
    parser.add_argument("--ratio", type=float, default=0.15, help="recompute ratio r: k = ceil(r * tokens)")
    parser.add_argument("--forced", type=int, default=32, help="forced tokens at the end of each request (query)")
    parser.add_argument("--requests", type=int, default=1, help="requests selected in one call")


def deviation_eager(fresh: torch.Tensor, reused: torch.Tensor) -> torch.Tensor:
    return (fresh.float() - reused.float()).square().sum(dim=(1, 2))


def topk_eager(dev: torch.Tensor, pool: torch.Tensor, forced_idx: torch.Tensor, k: int) -> torch.Tensor:
    top = torch.topk(dev.masked_fill(~pool, float("-inf")), k).indices
    return torch.sort(torch.cat([top, forced_idx])).values


def selection_eager(fresh, reused, pool, forced_idx, k):
    return topk_eager(deviation_eager(fresh, reused), pool, forced_idx, k)


def _table(title, results, args, nbytes=None, copy=None):
    """``results``: the implementations' timings; with ``nbytes`` (bytes one call must
    move) also GB/s and the percentage of the copy ``copy`` timed beside them (its row,
    ``CopyReference.NAME``, is shown last)."""
    columns = ["impl", "median ms", "speed-up vs eager"]
    if nbytes is not None:
        columns = ["impl", "median ms", "GB/s", "% of copy BW", "speed-up vs eager"]
    gpu = any("gpu_ops" in r for r in results.values())
    if gpu:
        columns.append("GPU ops")
    table = common.Table(title, columns)
    eager_ms = results["eager"]["median_ms"]
    reference = results.get(common.CopyReference.NAME)
    copy_gbps = copy.gbps(reference["median_ms"]) if nbytes is not None else None
    for name, r in results.items():
        if name == common.CopyReference.NAME:
            continue
        row = [name, r["median_ms"]]
        if nbytes is not None:
            r["gbps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
            r["pct_of_copy_bw"] = 100 * r["gbps"] / copy_gbps
            row += [r["gbps"], r["pct_of_copy_bw"]]
        r["speedup_vs_eager"] = eager_ms / r["median_ms"]
        row.append(r["speedup_vs_eager"])
        if gpu:
            row.append("?" if r.get("gpu_ops") is None else r["gpu_ops"])
        table.add(*row)
    if reference is not None and nbytes is not None:
        reference["gbps"] = copy_gbps
        table.add(common.CopyReference.NAME, reference["median_ms"], copy_gbps, 100.0, "", *([""] if gpu else []))
    print(table.render())
    if reference is not None and nbytes is not None:
        print(copy.describe(copy_gbps, [r["pct_of_copy_bw"] for n, r in results.items() if "pct_of_copy_bw" in r]))
    print()
    return table.as_dict()


def count_gpu_ops(fn) -> int | None:
    """Kernels and memcpy/memset operations one call of ``fn`` puts on the GPU (profiler)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        count = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        return count or None  # 0 means the profiler saw no device activity, not a free call
    except Exception as exc:  # pragma: no cover - depends on the profiler build
        common.progress(f"could not count GPU ops: {exc}")
        return None


def _time_all(impls: dict, device, args) -> dict:
    warmup, iters = common.iterations(args)
    impls = {name: fn for name, fn in impls.items() if fn is not None}
    if torch.device(device).type != "cuda":
        common.progress(f"timing {', '.join(impls)} (interleaved)")
        return common.time_interleaved(impls, warmup, iters)
    results = {}
    for name, fn in impls.items():
        common.progress(f"timing {name}")
        # The copy reference runs on a buffer larger than L2: no flush needed (nor counted).
        results[name] = common.time_fn(fn, device, warmup, iters, flush_l2=name != common.CopyReference.NAME)
        if name != common.CopyReference.NAME:
            results[name]["gpu_ops"] = count_gpu_ops(fn)
    return results


def run(args) -> dict:
    device, dtype = args.device, common.resolve_dtype(args)
    n, r = args.tokens, args.requests
    total = n * r
    k = min(math.ceil(args.ratio * n), n - args.forced)
    assert 0 <= args.forced <= n and k >= 0, "need 0 <= forced <= tokens"
    gen = torch.Generator(device="cpu").manual_seed(0)
    common.progress("allocating inputs")
    # One layer's K fits in CPU caches (a large shared L3): cycle through enough input
    # copies to exceed 1 GiB (on a GPU the L2 is flushed between calls instead).
    pair_bytes = 2 * total * args.kv_heads * args.head_dim * torch.empty(0, dtype=dtype).element_size()
    copies = 1 if device.startswith("cuda") else max(2, min(64, math.ceil((1 << 30) / max(pair_bytes, 1))))
    pairs = []
    for _ in range(copies):
        reused = torch.randn(total, args.kv_heads, args.head_dim, generator=gen).to(device=device, dtype=dtype)
        noise = torch.rand(total, 1, 1, generator=gen) * torch.randn(total, args.kv_heads, args.head_dim,
                                                                      generator=gen)
        pairs.append(((reused.float() + noise.to(device)).to(dtype), reused))
    fresh, reused = pairs[0]
    turn = iter(range(1 << 62))

    def next_pair():
        return pairs[next(turn) % copies]
    forced = torch.zeros(total, dtype=torch.bool, device=device)
    forced.view(r, n)[:, n - args.forced:] = True
    pool = ~forced
    forced_idx = torch.arange(n - args.forced, n, device=device)
    indptr = torch.arange(0, total + 1, n, device=device)
    kk = torch.full((r,), k, dtype=torch.int64, device=device)
    max_selected = k + args.forced
    dev = ops.kv_deviation(fresh, reused)

    # Sanity: cacheblend and the composite select the same tokens (random data, no ties).
    indices, counts = ops.select_hkvd_batched(dev, indptr, kk, forced, None, max_selected)
    want = topk_eager(dev[:n], pool[:n], forced_idx, k)
    if not torch.equal(indices[0, : int(counts[0])], want):
        print("WARNING: cacheblend and the composite selected different tokens")

    def cb_selection():
        f, u = next_pair()
        return ops.select_hkvd_batched(ops.kv_deviation(f, u), indptr, kk, forced, None, max_selected)

    def cb_selection_single():  # one request, reads the count back (host sync on CUDA)
        f, u = next_pair()
        return ops.select_hkvd(ops.kv_deviation(f[:n], u[:n]), k, forced[:n])

    def eager_selection(fn=selection_eager):
        f, u = next_pair()
        return [fn(f[i * n:(i + 1) * n], u[i * n:(i + 1) * n], pool[:n], forced_idx, k) for i in range(r)]

    def eager_topk():
        return [topk_eager(dev[i * n:(i + 1) * n], pool[:n], forced_idx, k) for i in range(r)]

    compiled_dev = common.maybe_compile(deviation_eager, args)
    compiled_sel = common.maybe_compile(selection_eager, args)
    compiled_topk = common.maybe_compile(topk_eager, args)

    copy = common.CopyReference(device)
    out = torch.empty(total, device=device)
    dev_results = _time_all({
        "cacheblend": lambda: ops.kv_deviation(*next_pair(), out=out),
        "eager": lambda: deviation_eager(*next_pair()),
        "torch.compile": (lambda: compiled_dev(*next_pair())) if compiled_dev else None,
        common.CopyReference.NAME: copy,
    }, device, args)
    sel_impls = {
        "cacheblend batched (no sync)": cb_selection,
        "eager": eager_selection,
        "torch.compile": (lambda: eager_selection(compiled_sel)) if compiled_sel else None,
    }
    if r == 1:
        sel_impls["cacheblend select_hkvd (reads count)"] = cb_selection_single
    sel_results = _time_all(sel_impls, device, args)
    topk_results = _time_all({
        "cacheblend": lambda: ops.select_hkvd_batched(dev, indptr, kk, forced, None, max_selected),
        "eager": eager_topk,
        "torch.compile": (lambda: [compiled_topk(dev[i * n:(i + 1) * n], pool[:n], forced_idx, k)
                                   for i in range(r)]) if compiled_topk else None,
    }, device, args)

    nbytes = 2 * fresh.numel() * fresh.element_size() + 4 * total
    shape = {"tokens": n, "requests": r, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": str(dtype),
             "k": k, "forced": args.forced, "input_copies": copies}
    desc = f"{r} x {n} tokens x {args.kv_heads} x {args.head_dim} {str(dtype).replace('torch.', '')}"
    tables = [
        _table(f"kv_deviation, K of one layer, {desc}", dev_results, args, nbytes, copy),
        _table(f"whole selection (deviation + top-{k} + {args.forced} forced, sorted), {desc}", sel_results, args),
        _table(f"top-k only (deviation given), {desc}", topk_results, args),
    ]
    copy_gbps = dev_results[common.CopyReference.NAME]["gbps"]
    print(f"device: {common.device_name(device)}")
    return {"command": args.command, "environment": common.environment(device), "shape": shape, "bytes": nbytes,
            "copy_bandwidth_gbps": copy_gbps,
            "results": {"deviation": dev_results, "selection": sel_results, "topk": topk_results},
            "tables": tables}
