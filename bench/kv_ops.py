"""``python -m bench rope`` and ``python -m bench concat``: the memory-bound KV ops.

rope:   re-position K of one layer in place ([T, H, D]); bytes = read + write of K.
concat: gather K and V of all chunks for all layers into a contiguous [L, N, H, D]
        request cache, re-rotating K; bytes = read + write of K and V, every layer.
GB/s of those bytes, and their share of a copy's timed in the same rounds ("% of copy BW",
bench/common.py).
Both are compared, in the same run, with eager PyTorch and torch.compile versions of the
same computation (table lookups, rotation in fp32, torch.cat + copy).
"""

from __future__ import annotations

import itertools

import torch

from bench import common
from cacheblend_ext import ops
from cacheblend_ext.rope import build_cos_sin_cache


def add_shape_arguments(parser) -> None:
    parser.add_argument("--layers", type=int, default=32, help="layers (concat; rope works on one layer)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim")
    parser.add_argument("--chunks", type=int, default=6, help="chunks of the request")
    parser.add_argument("--chunk-len", type=int, default=512, help="tokens per chunk")
    parser.add_argument("--gptj", action="store_true", help="interleaved (GPT-J) pairs instead of NeoX")


def _table(head_dim: int, max_pos: int, device) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return build_cos_sin_cache(inv_freq, max_pos, device=device)


def eager_reposition(key: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor,
                     is_neox: bool) -> torch.Tensor:
    """The same math in plain PyTorch ops (fp32), for [..., T, H, D] keys."""
    half = table.shape[1] // 2
    s, d = table[src], table[dst]
    cs, ss, cd, sd = s[:, :half], s[:, half:], d[:, :half], d[:, half:]
    inv = 1.0 / (cs * cs + ss * ss)
    c = ((cd * cs + sd * ss) * inv)[:, None, :]
    sn = ((sd * cs - cd * ss) * inv)[:, None, :]
    x = key.float()
    if is_neox:
        a, b = x[..., :half], x[..., half:]
        out = torch.cat([a * c - b * sn, b * c + a * sn], dim=-1)
    else:
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.stack([a * c - b * sn, b * c + a * sn], dim=-1).flatten(-2)
    return out.to(key.dtype)


def eager_concat(chunks, src, dst, table, is_neox, k_out, v_out):
    k_all = torch.cat([c[:, 0] for c in chunks], dim=1)
    k_out.copy_(eager_reposition(k_all, src, dst, table, is_neox))
    v_out.copy_(torch.cat([c[:, 1] for c in chunks], dim=1))


def bandwidth_report(title, results, nbytes, copy, args, device, extra):
    """The table of ``results`` (each implementation's timing, and the copy reference's):
    GB/s of the ``nbytes`` a call must move, and their share of the copy's GB/s."""
    reference = results[common.CopyReference.NAME]
    copy_gbps = reference["gbps"] = copy.gbps(reference["median_ms"])
    table = common.Table(title, ["impl", "median ms", "GB/s", "% of copy BW", "speed-up vs eager"])
    eager_ms = results["eager"]["median_ms"]
    for name, r in results.items():
        if name == common.CopyReference.NAME:
            continue
        gbps = nbytes / (r["median_ms"] * 1e-3) / 1e9
        r["gbps"] = gbps
        r["pct_of_copy_bw"] = 100 * gbps / copy_gbps
        table.add(name, r["median_ms"], gbps, r["pct_of_copy_bw"], eager_ms / r["median_ms"])
    table.add(common.CopyReference.NAME, reference["median_ms"], copy_gbps, 100.0, "")
    print(table.render())
    print(copy.describe(copy_gbps, [r["pct_of_copy_bw"] for r in results.values() if "pct_of_copy_bw" in r]))
    print(f"device: {common.device_name(device)}")
    return {"command": args.command, "environment": common.environment(device), "shape": extra, "bytes": nbytes,
            "copy_bandwidth_gbps": copy_gbps, "results": results, "table": table.as_dict()}


def _run_impls(impls: dict, device, args) -> dict:
    """Timings of ``impls`` (None entries skipped), with a :class:`common.CopyReference`
    added: on the CPU round-robin, one call of each per round (load from other processes
    hits them alike); on a GPU one after the other, L2 flushed before each call."""
    warmup, iters = common.iterations(args)
    copy = common.CopyReference(device)
    impls = {name: fn for name, fn in impls.items() if fn is not None}
    impls[common.CopyReference.NAME] = copy
    if torch.device(device).type != "cuda":
        common.progress(f"timing {', '.join(impls)} (interleaved)")
        return common.time_interleaved(impls, warmup, iters), copy
    results = {}
    for name, fn in impls.items():
        common.progress(f"timing {name}")
        results[name] = common.time_fn(fn, device, warmup, iters, flush_l2=name != common.CopyReference.NAME)
    return results, copy


def run_rope(args) -> dict:
    device, dtype = args.device, common.resolve_dtype(args)
    n = args.chunks * args.chunk_len
    is_neox = not args.gptj
    table = _table(args.head_dim, 2 * n + 1, device)
    # One layer's K fits in CPU caches: cycle through enough copies to exceed them (on a
    # GPU the L2 is flushed between calls instead).
    copies = 1 if device.startswith("cuda") else 16
    keys = [torch.randn(n, args.kv_heads, args.head_dim, device=device).to(dtype) for _ in range(copies)]
    key = keys[0]
    src = torch.arange(n, device=device) % args.chunk_len
    dst = torch.arange(n, device=device) + 1
    turn = itertools.count()

    def next_key():
        return keys[next(turn) % copies]

    def eager(k):
        k.copy_(eager_reposition(k, src, dst, table, is_neox))

    compiled_fn = common.maybe_compile(eager, args)
    impls = {
        "cacheblend": lambda: ops.rope_reposition(next_key(), src, dst, table, is_neox),
        "eager": lambda: eager(next_key()),
        "torch.compile": (lambda: compiled_fn(next_key())) if compiled_fn else None,
    }
    results, copy = _run_impls(impls, device, args)
    nbytes = 2 * key.numel() * key.element_size()
    shape = {"tokens": n, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": str(dtype), "neox": is_neox}
    return bandwidth_report(f"rope_reposition in place, K of one layer {tuple(key.shape)} {dtype}", results, nbytes,
                            copy, args, device, shape)


def run_concat(args) -> dict:
    device, dtype = args.device, common.resolve_dtype(args)
    n = args.chunks * args.chunk_len
    is_neox = not args.gptj
    table = _table(args.head_dim, n + 1, device)
    common.progress("allocating chunks")
    chunks = [torch.randn(args.layers, 2, args.chunk_len, args.kv_heads, args.head_dim, device=device).to(dtype)
              for _ in range(args.chunks)]
    src = (torch.arange(n, device=device) % args.chunk_len)
    dst = torch.arange(n, device=device) + 1  # after a one-token prefix
    slots = torch.arange(n, device=device)
    k_out = torch.empty(args.layers, n, args.kv_heads, args.head_dim, device=device, dtype=dtype)
    v_out = torch.empty_like(k_out)
    compiled_fn = common.maybe_compile(eager_concat, args)
    impls = {
        "cacheblend": lambda: ops.fused_kv_concat(chunks, src, dst, slots, table, is_neox, k_out, v_out),
        "eager": lambda: eager_concat(chunks, src, dst, table, is_neox, k_out, v_out),
        "torch.compile": (lambda: compiled_fn(chunks, src, dst, table, is_neox, k_out, v_out)) if compiled_fn else None,
    }
    results, copy = _run_impls(impls, device, args)
    nbytes = 2 * 2 * k_out.numel() * k_out.element_size()
    shape = {"layers": args.layers, "chunks": args.chunks, "chunk_len": args.chunk_len, "kv_heads": args.kv_heads,
             "head_dim": args.head_dim, "dtype": str(dtype), "neox": is_neox}
    return bandwidth_report(f"fused_kv_concat, {args.chunks} chunks x {args.chunk_len} tokens, {args.layers} layers, "
                            f"K+V {args.kv_heads}x{args.head_dim} {dtype}", results, nbytes, copy, args, device, shape)
