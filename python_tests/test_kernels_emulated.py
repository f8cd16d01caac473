"""The CUDA kernels of rope_reposition, fused_kv_concat, kv_deviation and
select_hkvd_batched, compiled for the host and run unchanged in the CUDA emulator
(csrc/emulation/) through the CUDA wrappers' own launch code, against the float64
references: their block / warp logic (radix select, block scans, shared rotation tables,
16-byte vector and scalar paths) is tested on every machine, GPU or not.
"""

from __future__ import annotations

import pytest
import torch

from cacheblend_ext import reference
from helpers import (DTYPES, assert_close_to_ref, assert_deviation_close, concat_request, expected_concat, poison_,
                     rope_table, selection_masks, strided)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 64), (80, 32), (6, 2)])
@pytest.mark.parametrize("num_tokens", [1, 65])
def test_rope_reposition(emulated_kernels, num_tokens, head_dim, rotary_dim, is_neox, dtype):
    table = rope_table(rotary_dim, 5000, factor=1.17)
    raw = torch.randn(num_tokens, 3, head_dim, dtype=torch.float64)
    src = torch.randint(0, 5000, (num_tokens,))
    dst = torch.randint(0, 5000, (num_tokens,))
    key = reference.rope_rotate(raw, src, table, is_neox).to(dtype)
    expected = reference.rope_rotate(raw, dst, table, is_neox)
    emulated_kernels.rope_reposition(key, src, dst, table, is_neox, key)  # in place
    assert_close_to_ref(key, expected, dtype, factor=2.0)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("out_offset", [8, 1], ids=["aligned", "misaligned"])
def test_rope_reposition_out_of_place_strided(emulated_kernels, out_offset, is_neox):
    """Out of place into a wider buffer: the pass-through dims are copied, nothing else
    is written; a misaligned output takes the scalar path."""
    table = rope_table(64, 5000)
    key = torch.randn(33, 4, 128, dtype=torch.bfloat16)
    src, dst = torch.randint(0, 5000, (33,)), torch.randint(0, 5000, (33,), dtype=torch.int32)
    wide = poison_(torch.empty(33, 4, 128 + 16, dtype=torch.bfloat16))
    out = wide[:, :, out_offset:out_offset + 128]
    emulated_kernels.rope_reposition(key, src, dst.long(), table, is_neox, out)
    expected = reference.rope_reposition(key, src, dst.long(), table, is_neox)
    assert_close_to_ref(out, expected, torch.bfloat16, factor=2.0)
    assert wide[:, :, :out_offset].isnan().all() and wide[:, :, out_offset + 128:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 32)])
def test_fused_kv_concat_contiguous(emulated_kernels, head_dim, rotary_dim, is_neox, dtype):
    gen = torch.Generator().manual_seed(2)
    table = rope_table(rotary_dim)
    chunks, src, dst = concat_request([1, 7, 65], head_dim, dtype, "cpu", gen)
    n = src.shape[0]
    k = poison_(torch.empty(chunks[0].shape[0], n, chunks[0].shape[3], head_dim, dtype=dtype))
    v = poison_(torch.empty_like(k))
    emulated_kernels.fused_kv_concat(chunks, src, dst, torch.arange(n), table, is_neox, list(k), list(v))
    k_ref, v_ref = expected_concat(chunks, src, dst, table, is_neox)
    assert_close_to_ref(k, k_ref, dtype)
    assert torch.equal(v.double(), v_ref)  # V is copied bit for bit


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_fused_kv_concat_paged_random_slots(emulated_kernels, index_dtype):
    """Paged destination [blocks, block_size, H, D], random distinct slots, -1 = skip: the
    written slots match, every other slot keeps its contents."""
    gen = torch.Generator().manual_seed(3)
    dtype, head_dim, block_size, num_blocks = torch.float16, 64, 16, 12
    table = rope_table(head_dim)
    chunks, src, dst = concat_request([9, 40, 3], head_dim, dtype, "cpu", gen, index_dtype)
    n = src.shape[0]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(index_dtype)
    slots[::5] = -1
    layers, heads = chunks[0].shape[0], chunks[0].shape[3]
    k_caches = [torch.randn(num_blocks, block_size, heads, head_dim, dtype=dtype) for _ in range(layers)]
    v_caches = [torch.randn_like(c) for c in k_caches]
    before_k, before_v = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
    emulated_kernels.fused_kv_concat(chunks, src, dst, slots, table, True, k_caches, v_caches)
    k_ref, v_ref = expected_concat(chunks, src, dst, table, True)
    written = slots >= 0
    for layer in range(layers):
        flat_k, flat_v = k_caches[layer].flatten(0, 1), v_caches[layer].flatten(0, 1)
        assert_close_to_ref(flat_k[slots[written].long()], k_ref[layer][written], dtype)
        assert torch.equal(flat_v[slots[written].long()].double(), v_ref[layer][written])
        untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
        untouched[slots[written].long()] = False
        assert torch.equal(flat_k[untouched], before_k[layer].flatten(0, 1)[untouched])
        assert torch.equal(flat_v[untouched], before_v[layer].flatten(0, 1)[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 8, 128), (65, 3, 64), (17, 1, 36), (9, 5, 12)])
def test_kv_deviation(emulated_kernels, dtype, shape):
    """Vector path ((·, ·, 64 / 128)) and scalar path (head dims not a multiple of a
    16-byte vector), contiguous and strided."""
    fresh, reused = torch.randn(*shape).to(dtype), torch.randn(*shape).to(dtype)
    for a, b in [(fresh, reused), (strided(fresh), strided(reused))]:
        out = poison_(torch.empty(shape[0]))
        emulated_kernels.kv_deviation(a, b, None, False, out)
        assert_deviation_close(out, reference.kv_deviation(a, b))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_kv_deviation_token_index_and_accumulate(emulated_kernels, index_dtype):
    fresh_k, fresh_v = torch.randn(40, 4, 64, dtype=torch.bfloat16), torch.randn(40, 4, 64, dtype=torch.bfloat16)
    reused_k, reused_v = torch.randn(300, 4, 64, dtype=torch.bfloat16), torch.randn(300, 4, 64, dtype=torch.bfloat16)
    index = torch.randperm(300)[:40].to(index_dtype)
    out = poison_(torch.empty(40))
    emulated_kernels.kv_deviation(fresh_k, reused_k, index, False, out)
    emulated_kernels.kv_deviation(fresh_v, reused_v, index, True, out)
    expected = reference.kv_deviation(fresh_k, reused_k, index) + reference.kv_deviation(fresh_v, reused_v, index)
    assert_deviation_close(out, expected)


def _select_reference(deviation, indptr, k, forced, candidates, max_selected):
    rows, counts = [], []
    for b in range(indptr.shape[0] - 1):
        lo, hi = int(indptr[b]), int(indptr[b + 1])
        sel = reference.select_hkvd(deviation[lo:hi], int(k[b]), None if forced is None else forced[lo:hi],
                                    None if candidates is None else candidates[lo:hi])
        counts.append(sel.numel())
        row = torch.full((max_selected,), -1, dtype=torch.int64)
        row[:min(max_selected, sel.numel())] = sel[:max_selected]
        rows.append(row)
    return torch.stack(rows), torch.tensor(counts, dtype=torch.int32)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("cand_frac", [None, 0.6])
def test_select_hkvd_batched(emulated_kernels, ties, cand_frac):
    """Requests of 0, 1, 7, 65, 1000 and 3001 tokens with k from 0 to past the candidate
    count, forced tokens, a candidate mask, ties (lower position first) and -0.0 / 0.0."""
    sizes = [0, 1, 7, 65, 1000, 3001]
    total = sum(sizes)
    if ties:
        deviation = torch.randint(0, 4, (total,)).float()
        deviation[::3] = -deviation[::3]
        deviation[::5] = -0.0
    else:
        deviation = torch.randn(total) * 10
    forced, candidates = selection_masks(total, "cpu", 0.05, cand_frac)
    indptr = torch.tensor([0] + sizes).cumsum(0)
    k = torch.tensor([3, 0, 7, 20, 150, 4000])
    max_selected = 600  # truncates the 3001-token request, which selects all of its candidates
    indices, counts = emulated_kernels.select_hkvd_batched(deviation, indptr, k, forced, candidates, max_selected)
    want_indices, want_counts = _select_reference(deviation, indptr, k, forced, candidates, max_selected)
    assert torch.equal(counts, want_counts)
    assert torch.equal(indices, want_indices)


def test_select_hkvd_batched_int32_and_extremes(emulated_kernels):
    deviation = torch.randn(2000) * 1e3
    deviation[[10, 20, 30, 40, 50]] = torch.tensor([float("inf"), float("-inf"), 3.4e38, -1e-40, 1e-40])
    indptr = torch.tensor([0, 700, 2000], dtype=torch.int32)
    k = torch.tensor([1, 1299], dtype=torch.int32)
    indices, counts = emulated_kernels.select_hkvd_batched(deviation, indptr, k, None, None, 1300)
    want_indices, want_counts = _select_reference(deviation, indptr, k, None, None, 1300)
    assert torch.equal(counts, want_counts) and torch.equal(indices, want_indices)
