"""fused_kv_concat against a torch.cat of separately re-rotated chunks (fp64 reference)."""

from __future__ import annotations

import pytest
import torch

from cacheblend_ext import ops
from helpers import (CONCAT_HEADS, CONCAT_LAYERS, DEVICES, DTYPES, assert_close_to_ref, concat_request,
                     expected_concat, poison_, rope_table)

LAYERS, HEADS = CONCAT_LAYERS, CONCAT_HEADS  # those of concat_request's chunks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (80, 32)])
def test_contiguous_destination(head_dim, rotary_dim, is_neox, dtype, device):
    gen = torch.Generator().manual_seed(2)
    lengths = [1, 7, 65, 513]
    table = rope_table(rotary_dim)
    chunks, src, dst = concat_request(lengths, head_dim, dtype, device, gen)
    n = sum(lengths)
    k = poison_(torch.empty(LAYERS, n, HEADS, head_dim, device=device, dtype=dtype))
    v = poison_(torch.empty_like(k))
    slots = torch.arange(n, device=device)
    ops.fused_kv_concat(chunks, src, dst, slots, table.to(device), is_neox, k, v)
    k_ref, v_ref = expected_concat(chunks, src, dst, table, is_neox)
    assert_close_to_ref(k, k_ref, dtype)
    assert torch.equal(v.cpu().double(), v_ref)  # V is copied bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_paged_destination_random_slots(index_dtype, dtype, device):
    """Paged per-layer caches, random slot mapping with -1 entries: written slots hold the
    re-rotated chunk KV, every other slot keeps its old contents."""
    gen = torch.Generator().manual_seed(3)
    lengths = [65, 1, 7, 40]
    n, head_dim, block_size, num_blocks = sum(lengths), 64, 16, 12
    table = rope_table(head_dim)
    chunks, src, dst = concat_request(lengths, head_dim, dtype, device, gen, index_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[torch.randperm(n, generator=gen)[:10]] = -1
    k_caches = [torch.randn(num_blocks, block_size, HEADS, head_dim, generator=gen).to(device, dtype) for _ in range(LAYERS)]
    v_caches = [torch.randn(num_blocks, block_size, HEADS, head_dim, generator=gen).to(device, dtype) for _ in range(LAYERS)]
    k_before = [c.clone() for c in k_caches]
    v_before = [c.clone() for c in v_caches]
    ops.fused_kv_concat(chunks, src, dst, slots.to(device, index_dtype), table.to(device), True, k_caches, v_caches)

    k_ref, v_ref = expected_concat(chunks, src, dst, table, True)
    keep = slots >= 0
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[keep]] = True
    for layer in range(LAYERS):
        k_flat = k_caches[layer].reshape(-1, HEADS, head_dim).cpu()
        v_flat = v_caches[layer].reshape(-1, HEADS, head_dim).cpu()
        assert_close_to_ref(k_flat[slots[keep]], k_ref[layer][keep], dtype)
        assert torch.equal(v_flat[slots[keep]].double(), v_ref[layer][keep])
        assert torch.equal(k_flat[~written], k_before[layer].reshape(-1, HEADS, head_dim).cpu()[~written])
        assert torch.equal(v_flat[~written], v_before[layer].reshape(-1, HEADS, head_dim).cpu()[~written])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
def test_strided_sources_and_many_chunks(misaligned, dtype, device):
    """Chunks that are views (token slices of one store buffer, heads permuted, rows one
    element off 16-byte alignment) are read in place; 40 chunks exceed one launch's chunk
    table on CUDA; per-layer list destinations."""
    gen = torch.Generator().manual_seed(4)
    head_dim = 64
    table = rope_table(head_dim)
    pad = 1 if misaligned else 0
    store = torch.randn(LAYERS, 2, 300, HEADS, head_dim + pad, generator=gen).to(device, dtype)[..., pad:]
    permuted = torch.randn(LAYERS, 2, HEADS, 50, head_dim, generator=gen).to(device, dtype).transpose(2, 3)
    lengths = [int(x) for x in torch.randint(1, 7, (40,), generator=gen)]
    chunks, begin = [], 0
    for i, t in enumerate(lengths):
        chunks.append(permuted[:, :, :t] if i % 5 == 0 else store[:, :, begin:begin + t])
        begin += t
    n = sum(lengths)
    src = torch.cat([torch.arange(t) for t in lengths]).to(device)
    dst = torch.randperm(4000, generator=gen)[:n].to(device)  # arbitrary target positions
    k = [poison_(torch.empty(n, HEADS, head_dim, device=device, dtype=dtype)) for _ in range(LAYERS)]
    v = [poison_(torch.empty(n, HEADS, head_dim, device=device, dtype=dtype)) for _ in range(LAYERS)]
    ops.fused_kv_concat(chunks, src, dst, torch.arange(n, device=device), table.to(device), True, k, v)
    k_ref, v_ref = expected_concat(chunks, src, dst, table, True)
    assert_close_to_ref(torch.stack(k), k_ref, dtype)
    assert torch.equal(torch.stack(v).cpu().double(), v_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_skipped(device):
    table = rope_table(64).to(device)
    k = torch.randn(LAYERS, 4, HEADS, 64, device=device)
    v = torch.randn_like(k)
    before = (k.clone(), v.clone())
    empty = torch.empty(0, dtype=torch.int64, device=device)
    ops.fused_kv_concat([], empty, empty, empty, table, True, k, v)
    chunk = torch.randn(LAYERS, 2, 3, HEADS, 64, device=device)
    skip = torch.full((3,), -1, device=device)
    ops.fused_kv_concat([chunk], torch.arange(3, device=device), torch.arange(3, device=device), skip, table, True, k, v)
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    table = rope_table(64).to(device)
    chunks = [torch.randn(LAYERS, 2, t, HEADS, 64, device=device) for t in (3, 5)]
    pos = torch.arange(8, device=device)
    k = [torch.randn(10, HEADS, 64, device=device) for _ in range(LAYERS)]
    v = [torch.randn(10, HEADS, 64, device=device) for _ in range(LAYERS)]
    torch.library.opcheck(torch.ops.cacheblend.fused_kv_concat.default,
                          (chunks, pos, pos + 2, pos, table, True, k, v))


def test_bad_inputs():
    table = rope_table(64)
    chunk = torch.randn(LAYERS, 2, 4, HEADS, 64)
    pos = torch.arange(4)
    k = torch.zeros(LAYERS, 8, HEADS, 64)
    cases = [
        (dict(slots=torch.tensor([0, 1, 8, 2])), r"slot_mapping\[2\] = 8 is outside \[-1, 8\)"),
        (dict(slots=torch.tensor([0, 1, 1, 2])), r"slot_mapping\[2\] = 1 repeats an earlier slot"),
        (dict(dst=torch.tensor([0, 1, 9000, 2])), r"dst_pos\[2\] = 9000 is outside"),
        (dict(chunks=[torch.randn(2, 2, 4, HEADS, 64)]), r"chunks\[0\] must be \[L=3, 2, T, H=2, D=64\]"),
        (dict(chunks=[chunk.half()]), r"chunks\[0\] must have the caches' dtype"),
        (dict(src=pos[:3]), "src_pos must have one entry per chunk token"),
        (dict(slots=pos.int()), "slot_mapping must have the dtype of src_pos"),
        (dict(v=torch.zeros(LAYERS, 9, HEADS, 64)), r"v_caches\[0\] must have the shape and strides of k_caches\[0\]"),
        (dict(v=torch.zeros(2, 8, HEADS, 64)), "v_caches must have one tensor per layer"),
        (dict(k=torch.zeros(LAYERS, 8, HEADS, 64, dtype=torch.int8)), "k_caches.0. must be float16, bfloat16 or float32"),
        (dict(table=torch.randn(100, 63)), "must be even"),
    ]
    for overrides, message in cases:
        args = dict(chunks=[chunk], src=pos, dst=pos, slots=pos, table=table, k=k.clone(), v=k.clone())
        args.update(overrides)
        with pytest.raises(RuntimeError, match=message):
            ops.fused_kv_concat(args["chunks"], args["src"], args["dst"], args["slots"], args["table"], True,
                                args["k"], args["v"])
