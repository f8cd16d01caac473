"""Sparse-query attention with the exact position-causal mask vs the alternatives.

Default shape: 32 query heads, 8 KV heads, head_dim 128, N = 4096 keys, M = 15% of N
queries at random distinct positions (sorted, as the blend engine passes its selection),
bf16 on a GPU, fp32 on the CPU. Measured in the same run:

- ``cacheblend <kernel>``: ``torch.ops.cacheblend.sparse_query_attention``. On CUDA every
  kernel side by side (``flash``, the default; ``flash_s2``; ``flash_s3``; ``flash_m32``;
  ``simt``; see
  ``cacheblend_ext.ops.attention_kernel``), the flash kernel at fixed key splits
  (``--tiles-per-split``), and ``sparse_query_attention_paged`` with each flash kernel
  over the same K / V scattered in a paged cache (``--page-size``);
- ``sdpa explicit mask``: SDPA with the exact boolean ``[M, N]`` mask (the exact alternative);
- ``sdpa bottom-right causal``: SDPA with ``causal_lower_right(M, N)`` (what public
  implementations use: a selected query sees keys past its own position);
- ``flex attention``: ``torch.nn.attention.flex_attention`` compiled, with the exact mask as
  a ``mask_mod`` (``kv_idx <= q_pos[q_idx]``) and a block mask built from the positions
  (outside the timing), GQA native;
- ``full prefill``: causal SDPA of all N queries (what selective recompute avoids);
- ``eager``: matmul / masked softmax / matmul in PyTorch, and its ``torch.compile``.

SDPA baselines get K / V already expanded to the query heads (outside the timing), so they
can use their fastest kernels. TFLOP/s count the exact-mask work ``4 * D * Hq *
sum(q_pos + 1)`` for every row except ``full prefill`` (its own causal work,
``4 * D * Hq * N (N + 1) / 2``). On a GPU the percentages are of the card's datasheet dense
bf16 rate and of a bf16 matrix product measured in the same run; on the CPU, of the
measured copy bandwidth over the q, k, v and out bytes. Every row also reports its largest
error against the float32 SDPA reference, so a fast wrong kernel shows.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import cacheblend_ext  # noqa: F401  (registers torch.ops.cacheblend)
from bench import common
from cacheblend_ext import ops

COMMAND = "attention"
HELP = "sparse-query attention (exact position-causal mask) vs SDPA, FlexAttention and eager baselines"


def add_arguments(parser) -> None:
    parser.add_argument("--num-tokens", type=int, default=4096, help="N: keys in the request (default 4096)")
    parser.add_argument("--ratio", type=float, default=0.15, help="M / N: selected queries (default 0.15)")
    parser.add_argument("--q-heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key / value heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    parser.add_argument("--unsorted", action="store_true", help="pass the positions in random order")
    parser.add_argument("--kernels", default=",".join(ops.ATTENTION_KERNELS),
                        help="CUDA kernels to time side by side (default: all, %(default)s)")
    parser.add_argument("--tiles-per-split", default="4,8,16,32",
                        help="CUDA: also time the flash kernel at these fixed key splits, in key tiles per "
                             "split (default %(default)s; '' for none)")
    parser.add_argument("--page-size", type=int, default=16,
                        help="CUDA: page size of the paged-cache row (default 16; 0 for none)")
    parser.add_argument("--no-prefill", action="store_true", help="skip the full-prefill baseline")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager (and compiled) baselines")
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baseline")
    parser.add_argument("--seed", type=int, default=0, help="random inputs (default 0)")


def _eager_attention(q, k, v, mask, scale):
    # q [Hq, M, D], k / v [Hq, N, D], mask [M, N] bool: materialises the M x N scores.
    scores = torch.matmul(q.float(), k.float().transpose(1, 2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def _flex_baseline(q, k, v, pos, scale, args):
    """FlexAttention with the exact mask, or None where this torch / device cannot run it."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        common.progress("flex attention unavailable in this torch")
        return None
    m, n = q.shape[0], k.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= pos[q_idx]

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=m, KV_LEN=n, device=q.device)
    flex = torch.compile(flex_attention, dynamic=False) if not args.no_compile else flex_attention
    q_h, k_h, v_h = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D] views

    def run():
        return flex(q_h, k_h, v_h, block_mask=block_mask, scale=scale, enable_gqa=True)

    return run, lambda: run()[0].transpose(0, 1)


def _paged_copy(k, v, page_size, gen):
    """k, v [N, Hkv, D] scattered over a paged cache in random page order: (k_cache,
    v_cache, kv_indptr, kv_indices, kv_last_page_len)."""
    n = k.shape[0]
    pages = -(-n // page_size)
    order = torch.randperm(pages, generator=gen).to(k.device)
    caches = []
    for t in (k, v):
        cache = torch.randn(pages, page_size, *t.shape[1:], generator=gen).to(t)
        padded = torch.cat([t, t.new_zeros(pages * page_size - n, *t.shape[1:])])
        cache[order] = padded.view(pages, page_size, *t.shape[1:])
        caches.append(cache)
    indptr = torch.tensor([0, pages], device=k.device)
    last = torch.tensor([n - (pages - 1) * page_size], device=k.device)
    return caches[0], caches[1], indptr, order, last


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = common.resolve_dtype(args)
    warmup, iters = common.iterations(args)
    gen = torch.Generator().manual_seed(args.seed)
    n, hq, hkv, d = args.num_tokens, args.q_heads, args.kv_heads, args.head_dim
    m = max(1, round(args.ratio * n))
    scale = d ** -0.5
    gpu = device.type == "cuda"

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
    reference = F.scaled_dot_product_attention(q_h.float(), k_h.float(), v_h.float(), attn_mask=mask)[0]
    reference = reference.transpose(0, 1)  # [M, Hq, D]

    peak = common.bf16_peak_tflops(device) if gpu else None
    matmul_peak = common.measure_bf16_matmul_tflops(device) if gpu else None
    copy_bw = common.measure_copy_bandwidth(device)
    io_bytes = (q.numel() + k.numel() + v.numel() + out.numel()) * q.element_size()

    def ours():
        torch.ops.cacheblend.sparse_query_attention(q, k, v, pos_dev, None, None, scale, out, None)
        return out

    # (name, fn returning the output, flops, note); `kernels`: the CUDA kernel choice a
    # cacheblend row runs under (set around its timing, not inside fn).
    candidates, kernels = [], {}
    if gpu:
        for impl in [x.strip() for x in args.kernels.split(",") if x.strip()]:
            candidates.append((f"cacheblend {impl}", ours, exact_flops, None))
            kernels[candidates[-1][0]] = (impl, 0)
        for tiles in [int(x) for x in args.tiles_per_split.split(",") if x.strip()]:
            candidates.append((f"cacheblend flash, {tiles} key tiles per split", ours, exact_flops, None))
            kernels[candidates[-1][0]] = ("flash", tiles)
        if args.page_size > 0:
            k_cache, v_cache, kv_indptr, kv_indices, last = _paged_copy(k, v, args.page_size, gen)
            q_indptr = torch.tensor([0, m], device=device)
            paged_out = torch.empty_like(q)

            def paged():
                torch.ops.cacheblend.sparse_query_attention_paged(q, k_cache, v_cache, pos_dev, q_indptr, kv_indptr,
                                                                  kv_indices, last, scale, paged_out, None)
                return paged_out

            for impl in [x.strip() for x in args.kernels.split(",") if x.strip().startswith("flash")]:
                candidates.append((f"cacheblend {impl}, paged cache (page size {args.page_size})", paged,
                                   exact_flops, None))
                kernels[candidates[-1][0]] = (impl, 0)
    else:
        candidates.append(("cacheblend (CPU kernel)", ours, exact_flops, None))
    candidates.append(("sdpa explicit mask",
                       lambda: F.scaled_dot_product_attention(q_h, k_h, v_h, attn_mask=mask)[0].transpose(0, 1),
                       exact_flops, None))
    try:
        from torch.nn.attention.bias import causal_lower_right

        br_mask = causal_lower_right(m, n)
        candidates.append(("sdpa bottom-right causal",
                           lambda: F.scaled_dot_product_attention(q_h, k_h, v_h, attn_mask=br_mask)[0].transpose(0, 1),
                           exact_flops, "inexact mask"))
    except ImportError:  # pragma: no cover - older torch
        common.progress("causal_lower_right unavailable; skipping the bottom-right baseline")
    if not args.no_flex:
        try:
            flex = _flex_baseline(q, k, v, pos_dev, scale, args)
        except Exception as exc:  # a torch / device that cannot build the block mask
            common.progress(f"flex attention unavailable: {type(exc).__name__}: {exc}")
            flex = None
        if flex is not None:
            candidates.append(("flex attention (block mask)", flex[1], exact_flops, None))
    if not args.no_prefill:
        q_full = torch.randn(1, hq, n, d, generator=gen).to(device, dtype)
        candidates.append(("full prefill (all N queries, causal)",
                           lambda: F.scaled_dot_product_attention(q_full, k_h, v_h, is_causal=True), prefill_flops,
                           "own work"))
    if not args.no_eager:
        candidates.append(("eager matmul-softmax-matmul",
                           lambda: _eager_attention(q_h[0], k_h[0], v_h[0], mask, scale).transpose(0, 1),
                           exact_flops, None))
        compiled = common.maybe_compile(_eager_attention, args)
        if compiled is not None:
            candidates.append(("torch.compile(eager)",
                               lambda: compiled(q_h[0], k_h[0], v_h[0], mask, scale).transpose(0, 1), exact_flops,
                               None))

    results, errors = {}, {}
    for name, fn, _, note in candidates:
        common.progress(name)
        try:
            with ops.attention_kernel(*kernels[name]) if name in kernels else contextlib.nullcontext():
                result = fn()
                if note != "own work":  # the same output: compare with the fp32 reference
                    errors[name] = (result.float() - reference).abs().max().item()
                results[name] = common.time_fn(fn, device, warmup, iters)
        except Exception as exc:  # a baseline that this torch / device cannot run
            common.progress(f"{name} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    base_name = candidates[0][0]
    base_ms = results[base_name]["median_ms"] if base_name in results else None

    columns = ["method", "median ms", "TFLOP/s"]
    columns += ["% bf16 peak (datasheet)", "% measured matmul"] if gpu else ["% copy BW (q,k,v,out bytes)"]
    columns += ["time / " + base_name, "max |err| vs fp32"]
    table = common.Table(
        f"sparse-query attention: M={m} queries ({'random order' if args.unsorted else 'sorted'}) x N={n} keys, "
        f"Hq={hq}, Hkv={hkv}, D={d}, {str(dtype).replace('torch.', '')}, {common.device_name(device)}",
        columns)
    rows = []
    for name, _, flops, note in candidates:
        if name not in results:
            continue
        ms = results[name]["median_ms"]
        tflops = flops / (ms * 1e-3) / 1e12
        gbs = io_bytes / (ms * 1e-3) / 1e9
        label = f"{name} [{note}]" if note else name
        ratio = ms / base_ms if base_ms else float("nan")
        err = errors.get(name, float("nan"))
        if gpu:
            table.add(label, ms, tflops, 100 * tflops / peak if peak else float("nan"),
                      100 * tflops / matmul_peak, f"{ratio:.2f}x", err)
        else:
            table.add(label, ms, tflops, 100 * gbs / copy_bw, f"{ratio:.2f}x", err)
        rows.append({"method": name, "note": note, **results[name], "tflops": tflops, "gbs": gbs,
                     "pct_bf16_peak": 100 * tflops / peak if peak else None,
                     "pct_measured_matmul": 100 * tflops / matmul_peak if matmul_peak else None,
                     "pct_copy_bw": 100 * gbs / copy_bw, "time_vs_first": ratio, "max_abs_err": err})
    print(table.render())
    print(f"measured copy bandwidth {copy_bw:.1f} GB/s"
          + (f"; measured bf16 matmul {matmul_peak:.0f} TFLOP/s (datasheet {peak} TFLOP/s)" if gpu else "")
          + f"; exact-mask work {exact_flops / 1e9:.2f} GFLOP")
    return {
        "command": COMMAND,
        "environment": common.environment(device),
        "shape": {"M": m, "N": n, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": str(dtype),
                  "sorted_positions": not args.unsorted},
        "exact_gflop": exact_flops / 1e9,
        "copy_bandwidth_gbs": copy_bw,
        "bf16_peak_tflops": peak,
        "measured_bf16_matmul_tflops": matmul_peak,
        "results": rows,
        "table": table.as_dict(),
    }
