"""Sparse-query attention with the exact position-causal mask vs the alternatives.

Default shape: 32 query heads, 8 KV heads, head_dim 128, N = 4096 keys, M = 15% of N
queries at random distinct positions (sorted, as the blend engine passes its selection),
bf16 on a GPU, fp32 on the CPU. Measured in the same run:

- ``cacheblend``: ``torch.ops.cacheblend.sparse_query_attention`` (on CUDA the default
  tensor-core kernel, plus its split-key kernel with and without cp.async,
  ``CACHEBLEND_ATTENTION_IMPL=split`` / ``split_sync``, and its SIMT kernel,
  ``CACHEBLEND_ATTENTION_IMPL=simt``);
- ``sdpa explicit mask``: SDPA with the exact boolean ``[M, N]`` mask (the exact alternative);
- ``sdpa bottom-right causal``: SDPA with ``causal_lower_right(M, N)`` (what public
  implementations use: a selected query sees keys past its own position);
- ``full prefill``: causal SDPA of all N queries (what selective recompute avoids);
- ``eager``: matmul / masked softmax / matmul in PyTorch, and its ``torch.compile``.

SDPA baselines get K / V already expanded to the query heads (outside the timing), so
they can use their fastest kernels. TFLOP/s count the exact-mask work
``4 * D * Hq * sum(q_pos + 1)`` for every row except ``full prefill`` (its own causal
work, ``4 * D * Hq * N (N + 1) / 2``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import cacheblend_ext  # noqa: F401  (registers torch.ops.cacheblend)
from bench import common

COMMAND = "attention"
HELP = "sparse-query attention (exact position-causal mask) vs SDPA and eager baselines"


def add_arguments(parser) -> None:
    parser.add_argument("--num-tokens", type=int, default=4096, help="N: keys in the request (default 4096)")
    parser.add_argument("--ratio", type=float, default=0.15, help="M / N: selected queries (default 0.15)")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--unsorted", action="store_true", help="pass the positions in random order")
    parser.add_argument("--no-prefill", action="store_true", help="skip the full-prefill baseline")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager (and compiled) baselines")
    parser.add_argument("--seed", type=int, default=0)


def _eager_attention(q, k, v, mask, scale):
    # q [Hq, M, D], k / v [Hq, N, D], mask [M, N] bool: materialises the M x N scores.
    scores = torch.matmul(q.float(), k.float().transpose(1, 2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = common.resolve_dtype(args)
    warmup, iters = common.iterations(args)
    gen = torch.Generator().manual_seed(args.seed)
    n, hq, hkv, d = args.num_tokens, args.q_heads, args.kv_heads, args.head_dim
    m = max(1, round(args.ratio * n))
    scale = d ** -0.5

    pos = torch.randperm(n, generator=gen)[:m]
    pos = pos if args.unsorted else pos.sort().values
    q = torch.randn(m, hq, d, generator=gen).to(device, dtype)
    k = torch.randn(n, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(n, hkv, d, generator=gen).to(device, dtype)
    pos_dev = pos.to(device)
    out = torch.empty_like(q)

    # SDPA layouts: [1, H, T, D], K / V expanded to the query heads.
    group = hq // hkv
    q_h = q.transpose(0, 1).unsqueeze(0).contiguous()
    k_h = k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    v_h = v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    mask = torch.arange(n, device=device)[None, :] <= pos_dev[:, None]
    exact_flops = 4.0 * d * hq * float((pos.double() + 1).sum())
    prefill_flops = 4.0 * d * hq * n * (n + 1) / 2

    peak = common.bf16_peak_tflops(device) if dtype != torch.float32 else None
    copy_bw = common.measure_copy_bandwidth(device)
    io_bytes = (q.numel() + k.numel() + v.numel() + out.numel()) * q.element_size()

    def ours():
        torch.ops.cacheblend.sparse_query_attention(q, k, v, pos_dev, None, None, scale, out, None)

    candidates = [("cacheblend sparse_query_attention", ours, exact_flops, None)]
    if device.type == "cuda":

        def with_impl(impl):
            def fn():
                previous = os.environ.get("CACHEBLEND_ATTENTION_IMPL")
                os.environ["CACHEBLEND_ATTENTION_IMPL"] = impl
                try:
                    ours()
                finally:
                    if previous is None:
                        os.environ.pop("CACHEBLEND_ATTENTION_IMPL", None)
                    else:
                        os.environ["CACHEBLEND_ATTENTION_IMPL"] = previous

            return fn

        candidates.append(("cacheblend (split kernel, cp.async)", with_impl("split"), exact_flops, None))
        candidates.append(("cacheblend (split kernel, no cp.async)", with_impl("split_sync"), exact_flops, None))
        candidates.append(("cacheblend (SIMT kernel)", with_impl("simt"), exact_flops, None))
    candidates.append(("sdpa explicit mask", lambda: F.scaled_dot_product_attention(q_h, k_h, v_h, attn_mask=mask),
                       exact_flops, None))
    try:
        from torch.nn.attention.bias import causal_lower_right

        br_mask = causal_lower_right(m, n)
        candidates.append(("sdpa bottom-right causal (approx.)",
                           lambda: F.scaled_dot_product_attention(q_h, k_h, v_h, attn_mask=br_mask), exact_flops,
                           "inexact"))
    except ImportError:  # pragma: no cover - older torch
        common.progress("causal_lower_right unavailable; skipping the bottom-right baseline")
    if not args.no_prefill:
        q_full = torch.randn(1, hq, n, d, generator=gen).to(device, dtype)
        candidates.append(("full prefill (all N queries, causal)",
                           lambda: F.scaled_dot_product_attention(q_full, k_h, v_h, is_causal=True), prefill_flops,
                           "own work"))
    if not args.no_eager:
        eager = lambda: _eager_attention(q_h[0], k_h[0], v_h[0], mask, scale)  # noqa: E731
        candidates.append(("eager matmul-softmax-matmul", eager, exact_flops, None))
        compiled = common.maybe_compile(_eager_attention, args)
        if compiled is not None:
            candidates.append(("torch.compile(eager)", lambda: compiled(q_h[0], k_h[0], v_h[0], mask, scale),
                               exact_flops, None))

    # Correctness check of the op against SDPA with the exact mask.
    ours()
    ref = F.scaled_dot_product_attention(q_h.float(), k_h.float(), v_h.float(), attn_mask=mask)[0].transpose(0, 1)
    max_err = (out.float() - ref).abs().max().item()

    results = {}
    for name, fn, _, _ in candidates:
        common.progress(name)
        try:
            results[name] = common.time_fn(fn, device, warmup, iters)
        except Exception as exc:  # a baseline that this torch / device cannot run
            common.progress(f"{name} failed: {type(exc).__name__}: {exc}")
    base_ms = results[candidates[0][0]]["median_ms"]

    table = common.Table(
        f"sparse-query attention: M={m} queries ({'random order' if args.unsorted else 'sorted'}) x N={n} keys, "
        f"Hq={hq}, Hkv={hkv}, D={d}, {str(dtype).replace('torch.', '')}, {common.device_name(device)}",
        ["method", "median ms", "TFLOP/s", "% bf16 peak" if peak else "% copy BW (q,k,v,out bytes)", "time / cacheblend"],
    )
    rows = []
    for name, _, flops, note in candidates:
        if name not in results:
            continue
        ms = results[name]["median_ms"]
        tflops = flops / (ms * 1e-3) / 1e12
        speedup = ms / base_ms
        label = f"{name} [{note}]" if note else name
        gbs = io_bytes / (ms * 1e-3) / 1e9
        pct = 100 * tflops / peak if peak else 100 * gbs / copy_bw
        table.add(label, ms, tflops, pct, f"{speedup:.2f}x")
        rows.append({"method": name, "note": note, **results[name], "tflops": tflops, "gbs": gbs,
                     "pct_bf16_peak": 100 * tflops / peak if peak else None, "pct_copy_bw": 100 * gbs / copy_bw,
                     "time_vs_cacheblend": speedup})
    print(table.render())
    print(f"max |cacheblend - sdpa explicit mask| = {max_err:.3e}; measured copy bandwidth {copy_bw:.1f} GB/s; "
          f"exact-mask work {exact_flops / 1e9:.2f} GFLOP")
    return {
        "command": COMMAND,
        "environment": common.environment(device),
        "shape": {"M": m, "N": n, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": str(dtype),
                  "sorted_positions": not args.unsorted},
        "exact_gflop": exact_flops / 1e9,
        "copy_bandwidth_gbs": copy_bw,
        "bf16_peak_tflops": peak,
        "max_abs_err_vs_sdpa": max_err,
        "results": rows,
        "table": table.as_dict(),
    }
