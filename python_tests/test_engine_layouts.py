"""fused_kv_concat into the serving engines' own paged KV layouts, in place.

Every layout is written through strided views of the engine's buffers and must hold
exactly what the contiguous path writes at the same slots, with every other element of
the buffers untouched: on the CPU and through the CUDA kernel in the host emulator
(vector and scalar paths). ``make_engine_cache`` / ``engine_views`` build the layouts;
test_paged_attention.py reads the same layouts.
"""

from __future__ import annotations

import pytest
import torch

from cacheblend_ext import ops
from helpers import (DTYPES, ENGINE_LAYERS, ENGINE_LAYOUTS, HAS_CUDA, EngineCache, assert_close_to_ref, concat_request,
                     engine_views, make_engine_cache, poison_, rope_table)

LAYERS, HEADS = ENGINE_LAYERS, 2

def slot_rows(cache: EngineCache, view: torch.Tensor) -> torch.Tensor:
    """``[num_pages * page_size, H, D]`` (a copy) of one engine view, in slot order."""
    nhd = ops.paged_view(view, cache.layout)
    return nhd.reshape(-1, *nhd.shape[-2:]) if nhd.dim() == 4 else nhd


def same_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _concat_into_engine(kind, page_size, dtype, concat, lengths=(1, 7, 65), head_dim=64, seed=0, device="cpu"):
    """Concatenate random chunks into ``kind``'s buffers at random pages (a few tokens
    skipped) with ``concat`` and into a contiguous destination with the registered op;
    checks the engine's buffers hold the contiguous result at the slots and are
    untouched (still NaN) everywhere else."""
    gen = torch.Generator().manual_seed(seed)
    table = rope_table(head_dim)
    chunks, src, dst = concat_request(list(lengths), head_dim, dtype, "cpu", gen)
    chunks = [c[:LAYERS] for c in chunks]
    n = src.shape[0]
    num_pages = -(-n // page_size) + 3
    pages = torch.randperm(num_pages, generator=gen)
    slots = pages[torch.arange(n) // page_size] * page_size + torch.arange(n) % page_size
    slots[torch.randperm(n, generator=gen)[: n // 9]] = -1
    cache = make_engine_cache(kind, num_pages, page_size, HEADS, head_dim, dtype, device=device)
    ks, vs = zip(*(engine_views(cache, l) for l in range(LAYERS)))
    concat([c.to(device) for c in chunks], src.to(device), dst.to(device), slots.to(device), table.to(device), ks, vs,
           cache.layout)

    k_ref = poison_(torch.empty(LAYERS, n, HEADS, head_dim, dtype=dtype))
    v_ref = poison_(torch.empty_like(k_ref))
    ops.fused_kv_concat(chunks, src, dst, torch.arange(n), table, True, k_ref, v_ref)
    keep = slots >= 0
    expected = make_engine_cache(kind, num_pages, page_size, HEADS, head_dim, dtype)
    for l in range(LAYERS):
        k_rows, v_rows = slot_rows(cache, ks[l]).cpu(), slot_rows(cache, vs[l]).cpu()
        if device == "cpu":
            assert torch.equal(k_rows[slots[keep]], k_ref[l][keep]), f"K of layer {l} differs from the contiguous path"
        else:
            assert_close_to_ref(k_rows[slots[keep]], k_ref[l][keep].double(), dtype, factor=2.0)
        assert torch.equal(v_rows[slots[keep]], v_ref[l][keep]), f"V of layer {l} differs from the contiguous path"
        # the same writes, through plain indexing of the expected buffers' views
        ek, ev = (ops.paged_view(t, cache.layout) for t in engine_views(expected, l))
        flat = slots[keep]
        if ek.dim() == 4:
            ek[flat // page_size, flat % page_size] = k_ref[l][keep]
            ev[flat // page_size, flat % page_size] = v_ref[l][keep]
        else:
            ek[flat], ev[flat] = k_ref[l][keep], v_ref[l][keep]
    for got, want in zip(cache.buffers, expected.buffers):
        got = got.cpu()
        assert torch.equal(got.isnan(), want.isnan()), "an element outside the written slots changed"
        assert device != "cpu" or same_or_both_nan(got, want)
    return cache


def _concat_op(chunks, src, dst, slots, table, ks, vs, layout):
    ops.fused_kv_concat(chunks, src, dst, slots, table, True, list(ks), list(vs), layout=layout)


def _concat_emulated(emulated):
    def concat(chunks, src, dst, slots, table, ks, vs, layout):
        emulated.fused_kv_concat(chunks, src, dst, slots, table, True, [ops.paged_view(k, layout) for k in ks],
                                 [ops.paged_view(v, layout) for v in vs])
    return concat


def _page_size(kind, page_size):
    return 1 if kind == "sglang" else page_size


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [16, 5, 1])
@pytest.mark.parametrize("kind", list(ENGINE_LAYOUTS))
def test_concat_cpu(kind, page_size, dtype):
    if kind == "sglang" and page_size != 1:
        pytest.skip("SGLang pools are page size 1")
    _concat_into_engine(kind, page_size, dtype, _concat_op)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [16, 5, 1])
@pytest.mark.parametrize("kind", list(ENGINE_LAYOUTS))
def test_concat_emulated(emulated_kernels, kind, page_size, dtype):
    """The CUDA kernel: 16-byte vectors for every aligned layout (interleaved K/V, HND
    views, all-layers buffers), scalar accesses for the misaligned one."""
    if kind == "sglang" and page_size != 1:
        pytest.skip("SGLang pools are page size 1")
    _concat_into_engine(kind, page_size, dtype, _concat_emulated(emulated_kernels), lengths=(1, 7, 20))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or CUDA kernels not built)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(ENGINE_LAYOUTS))
def test_concat_cuda(kind, dtype):
    """The CUDA kernel on a GPU: V bit for bit, K within rounding of the contiguous CPU op
    (RoPE in another order of operations), nothing else written."""
    _concat_into_engine(kind, 1 if kind == "sglang" else 5, dtype, _concat_op, device="cuda")


def test_concat_stacked_hnd_and_bad_layouts():
    """One stacked [L, num_blocks, H, block_size, D] tensor with layout='HND'; wrong
    layouts and shapes are refused by name."""
    gen = torch.Generator().manual_seed(5)
    table = rope_table(64)
    chunks, src, dst = concat_request([9], 64, torch.float32, "cpu", gen)
    chunks = [c[:LAYERS] for c in chunks]
    k = poison_(torch.empty(LAYERS, 3, HEADS, 4, 64))
    v = poison_(torch.empty_like(k))
    ops.fused_kv_concat(chunks, src, dst, torch.arange(9) + 2, table, True, k, v, layout="HND")
    k_ref = poison_(torch.empty(LAYERS, 9, HEADS, 64))
    v_ref = poison_(torch.empty_like(k_ref))
    ops.fused_kv_concat(chunks, src, dst, torch.arange(9), table, True, k_ref, v_ref)
    assert torch.equal(k.transpose(2, 3).reshape(LAYERS, 12, HEADS, 64)[:, 2:11], k_ref)
    assert torch.equal(v.transpose(2, 3).reshape(LAYERS, 12, HEADS, 64)[:, 2:11], v_ref)
    with pytest.raises(ValueError, match="layout must be 'NHD' or 'HND'"):
        ops.fused_kv_concat(chunks, src, dst, torch.arange(9), table, True, k, v, layout="nhd")
    with pytest.raises(ValueError, match=r"k_caches\[0\] with layout='HND' must be \[num_blocks, H, block_size, D\]"):
        ops.fused_kv_concat(chunks, src, dst, torch.arange(9), table, True, list(k_ref), list(v_ref), layout="HND")
    expanded = torch.zeros(1, 1, HEADS, 64).expand(3, 4, HEADS, 64)
    with pytest.raises(RuntimeError, match=r"k_caches\[l\] must not be an expanded view"):
        ops.fused_kv_concat(chunks, src, dst, torch.arange(9), table, True, [expanded] * LAYERS, [expanded] * LAYERS)


@pytest.mark.parametrize("kind", ["vllm_kv_inner", "vllm_all_layers_hnd", "flashinfer_hnd_pair"])
def test_concat_opcheck(kind):
    """The schema (mutated Tensor(a!)[] lists) holds for strided engine views too."""
    gen = torch.Generator().manual_seed(6)
    table = rope_table(64)
    chunks, src, dst = concat_request([3, 5], 64, torch.float32, "cpu", gen)
    chunks = [c[:LAYERS] for c in chunks]
    cache = make_engine_cache(kind, 4, 4, HEADS, 64, torch.float32, fill=0.0)
    ks, vs = zip(*(engine_views(cache, l) for l in range(LAYERS)))
    ks = [ops.paged_view(k, cache.layout) for k in ks]
    vs = [ops.paged_view(v, cache.layout) for v in vs]
    torch.library.opcheck(torch.ops.cacheblend.fused_kv_concat.default,
                          (chunks, src, dst, torch.randperm(16, generator=gen)[:8], table, True, ks, vs))
