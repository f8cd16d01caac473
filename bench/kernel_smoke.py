"""Every CUDA kernel of the extension once, at small sizes, each checked against its float64
reference: the program ``bench/gpu_check.sh`` runs under compute-sanitizer (memcheck and
racecheck), small enough for the sanitizer's slowdown.

    python -m bench.kernel_smoke [--device cuda]

Prints one line per kernel and exits non-zero when a result is wrong. On the CPU it runs
the CPU kernels (the dry run of gpu_check.sh).
"""

from __future__ import annotations

import argparse
import sys

import torch

from cacheblend_ext import ops, reference


def _table(rotary_dim: int, max_pos: int = 512) -> torch.Tensor:
    half = rotary_dim // 2
    inv = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([angles.cos(), angles.sin()], -1).float()


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    ok = err <= tol and not torch.isnan(got).any()
    print(f"{'ok ' if ok else 'BAD'} {name}: relative max error {err:.2e}")
    return ok


def _has_variants() -> bool:
    """Whether this build has the attention kernel's benchmarking variants."""
    try:
        with ops.attention_kernel("flash_s2"):
            return True
    except RuntimeError:
        print("note: a build without CACHEBLEND_ATTENTION_VARIANTS=1: the default kernels only")
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    ok = True

    # rope_reposition (both styles) and fused_kv_concat.
    table = _table(64).to(dev)
    for is_neox in (True, False):
        key = torch.randn(33, 4, 128, generator=gen).to(dev, torch.bfloat16)
        src, dst = torch.randint(0, 512, (33,), generator=gen).to(dev), torch.randint(0, 512, (33,), generator=gen).to(dev)
        out = torch.empty_like(key)
        ops.rope_reposition(key, src, dst, table, is_neox, out=out)
        ok &= _close(f"rope_reposition ({'neox' if is_neox else 'gptj'})", out,
                     reference.rope_reposition(key.cpu(), src.cpu(), dst.cpu(), table.cpu(), is_neox), 2e-2)
    chunks = [torch.randn(2, 2, t, 4, 128, generator=gen).to(dev, torch.bfloat16) for t in (7, 20)]
    n = 27
    src = torch.arange(n).to(dev)
    dst = (torch.arange(n) + 5).to(dev)
    slots = torch.randperm(40, generator=gen)[:n].to(dev)
    k_caches = torch.zeros(2, 40, 4, 128, device=dev, dtype=torch.bfloat16)
    v_caches = torch.zeros_like(k_caches)
    ops.fused_kv_concat(chunks, src, dst, slots, table, True, k_caches, v_caches)
    want_k, want_v = torch.zeros_like(k_caches).cpu().double(), torch.zeros_like(v_caches).cpu().double()
    reference.fused_kv_concat([c.cpu() for c in chunks], src.cpu(), dst.cpu(), slots.cpu(), table.cpu(), True,
                              want_k, want_v)
    ok &= _close("fused_kv_concat K", k_caches, want_k, 2e-2) & _close("fused_kv_concat V", v_caches, want_v, 1e-2)

    # kv_deviation + select_hkvd_batched.
    fresh = torch.randn(300, 4, 128, generator=gen).to(dev, torch.bfloat16)
    reused = torch.randn(300, 4, 128, generator=gen).to(dev, torch.bfloat16)
    dev_scores = ops.kv_deviation(fresh, reused)
    ok &= _close("kv_deviation", dev_scores, reference.kv_deviation(fresh.cpu(), reused.cpu()), 1e-4)
    indptr = torch.tensor([0, 100, 300], device=dev)
    indices, counts = ops.select_hkvd_batched(dev_scores, indptr, torch.tensor([10, 30], device=dev), None, None, 64)
    want = reference.select_hkvd(dev_scores[100:].cpu(), 30)
    good = torch.equal(indices[1, :30].cpu(), want) and int(counts[1]) == 30
    print(f"{'ok ' if good else 'BAD'} select_hkvd_batched")
    ok &= good

    # sparse_query_attention: every kernel, a key split with the combine kernel, and the
    # paged op (flash and SIMT).
    m, nk, hq, hkv = 70, 700, 8, 2
    variants = ("flash_s2", "flash_s3", "flash_m32") if dev.type == "cuda" and _has_variants() else ()
    kernels = [(impl, tiles) for impl in ("flash", *variants) for tiles in (0, 2)]
    kernels.append(("simt", 0))
    if dev.type != "cuda":
        kernels = [(None, 0)]
    for d in (64, 128):
        q = torch.randn(m, hq, d, generator=gen).to(dev, torch.bfloat16)
        k = torch.randn(nk, hkv, d, generator=gen).to(dev, torch.bfloat16)
        v = torch.randn(nk, hkv, d, generator=gen).to(dev, torch.bfloat16)
        pos = torch.randperm(nk, generator=gen)[:m].sort().values.to(dev)
        want, _ = reference.sparse_query_attention(q.cpu(), k.cpu(), v.cpu(), pos.cpu())
        for impl, tiles in kernels:
            if impl is None:
                got = ops.sparse_query_attention(q, k, v, pos)
            else:
                with ops.attention_kernel(impl, tiles):
                    got = ops.sparse_query_attention(q, k, v, pos)
            ok &= _close(f"sparse_query_attention {impl or 'cpu'} D={d} tiles_per_split={tiles}", got, want, 3e-2)
        page = 16
        pages = -(-nk // page)
        order = torch.randperm(pages, generator=gen).to(dev)
        caches = []
        for t in (k, v):
            cache = torch.zeros(pages, page, hkv, d, device=dev, dtype=t.dtype)
            cache[order] = torch.cat([t, t.new_zeros(pages * page - nk, hkv, d)]).view(pages, page, hkv, d)
            caches.append(cache)
        last = torch.tensor([nk - (pages - 1) * page], device=dev)
        q_indptr, kv_indptr = torch.tensor([0, m], device=dev), torch.tensor([0, pages], device=dev)
        for impl in (["flash", *variants, "simt"] if dev.type == "cuda" else [None]):
            if impl is None:
                got = ops.sparse_query_attention_paged(q, tuple(caches), pos, q_indptr, kv_indptr, order, last)
            else:
                with ops.attention_kernel(impl):
                    got = ops.sparse_query_attention_paged(q, tuple(caches), pos, q_indptr, kv_indptr, order, last)
            ok &= _close(f"sparse_query_attention_paged {impl or 'cpu'} D={d}", got, want, 3e-2)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("all kernels ok" if ok else "SOME KERNELS WRONG")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
