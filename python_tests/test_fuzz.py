"""Property-based tests of every op (hypothesis): random shapes, strides, dtypes, index
patterns and ragged batches against the float64 references in cacheblend_ext.ops.reference,
and random bad arguments, each of which must raise RuntimeError / ValueError naming the
argument (never crash the process).

Bounded for CI: the "cacheblend" profile (the default) runs a fixed number of examples
per test with a deadline and a derandomised seed, so runs are reproducible; set
HYPOTHESIS_PROFILE=deep for a longer local search. Every test runs on the CPU kernels, on
the CUDA kernels when a GPU is present, and a few examples also run the CUDA kernels in
the host emulator (the `emulated_kernels` fixture).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from cacheblend_ext import ops, reference
from torch.ops import cacheblend as raw_ops  # the registered ops, without the wrappers
from conftest import DEVICES, assert_close_to_ref, poison_

settings.register_profile(
    "cacheblend",
    max_examples=40,
    # ms per example: catches a hang or a runaway example, with room for a shared 2-core
    # machine under load (an example that takes 20 ms idle took 3.6 s there once).
    deadline=20000,
    derandomize=True,
    database=None,  # derandomised: every run draws the same examples
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile("deep", parent=settings.get_profile("cacheblend"), max_examples=500, derandomize=False,
                          database=DirectoryBasedExampleDatabase(".hypothesis/examples"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cacheblend"))

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]
EMULATED = settings(max_examples=10)  # examples that run through the host CUDA emulator


# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------


def _tensor(draw, shape, dtype, device, *, pad_token=None, pad_head=None, pad_dim=None, offset=None):
    """Random values of `shape` [T, H, D] as a view into a larger buffer: padding after the
    head and last dims and a leading element offset give arbitrary token / head strides
    and alignments, with the last dim contiguous."""
    t, h, d = shape
    pad_head = draw(st.integers(0, 2)) if pad_head is None else pad_head
    pad_dim = draw(st.sampled_from([0, 0, 1, 8])) if pad_dim is None else pad_dim
    offset = draw(st.sampled_from([0, 0, 1, 8])) if offset is None else offset
    row = (h + pad_head) * (d + pad_dim)
    base = torch.randn(offset + max(t, 1) * row, dtype=torch.float32).to(dtype).to(device)
    view = base[offset:offset + t * row].view(t, h + pad_head, d + pad_dim)[:, :h, :d]
    assert view.stride(-1) == 1
    return view


def _positions(draw, n, limit, dtype, device):
    values = draw(st.lists(st.integers(0, limit - 1), min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype, device=device)


def _cos_sin_cache(rotary_dim, max_pos=64, factor=1.0):
    half = rotary_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) * 2 / rotary_dim))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None]
    return (torch.cat([angles.cos(), angles.sin()], dim=-1) * factor).float()


# ---------------------------------------------------------------------------------------
# rope_reposition / rope_reposition_out
# ---------------------------------------------------------------------------------------


@st.composite
def rope_cases(draw, device="cpu"):
    half = draw(st.integers(1, 40))
    rotary_dim = 2 * half
    head_dim = rotary_dim + draw(st.sampled_from([0, 0, 2, 8, 16]))
    num_tokens = draw(st.integers(0, 12))
    heads = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    index_dtype = draw(st.sampled_from(INDEX_DTYPES))
    table = _cos_sin_cache(rotary_dim, factor=draw(st.sampled_from([1.0, 1.3]))).to(device)
    key = _tensor(draw, (num_tokens, heads, head_dim), dtype, device)
    src = _positions(draw, num_tokens, table.shape[0], index_dtype, device)
    dst = _positions(draw, num_tokens, table.shape[0], index_dtype, device)
    is_neox = draw(st.booleans())
    out_of_place = draw(st.booleans())
    out = _tensor(draw, key.shape, dtype, device) if out_of_place else None
    return key, src, dst, table, is_neox, out


def _check_rope(run, case):
    key, src, dst, table, is_neox, out = case
    expected = reference.rope_reposition(key.cpu(), src.cpu(), dst.cpu(), table.cpu(), is_neox)
    before = key.clone()
    result = run(key, src, dst, table, is_neox, out)
    assert_close_to_ref(result, expected, key.dtype, factor=2.0)
    if out is not None:
        assert torch.equal(key, before), "out of place: key must be left unchanged"


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_rope_reposition(device, data):
    case = data.draw(rope_cases(device))
    _check_rope(lambda k, s, d, t, n, o: ops.rope_reposition(k, s, d, t, n, out=o), case)


@EMULATED
@given(case=rope_cases())
def test_rope_reposition_emulated(emulated_kernels, case):
    def run(key, src, dst, table, is_neox, out):
        target = key if out is None else poison_(out)
        emulated_kernels.rope_reposition(key, src, dst, table, is_neox, target)
        return target

    _check_rope(run, case)


# ---------------------------------------------------------------------------------------
# fused_kv_concat
# ---------------------------------------------------------------------------------------


@st.composite
def concat_cases(draw, device="cpu"):
    layers, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    half = draw(st.integers(1, 16))
    rotary_dim = 2 * half
    head_dim = rotary_dim + draw(st.sampled_from([0, 0, 8]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    index_dtype = draw(st.sampled_from(INDEX_DTYPES))
    lengths = draw(st.lists(st.integers(0, 7), min_size=0, max_size=4))
    chunks = []
    for n in lengths:
        flat = _tensor(draw, (layers * 2 * n, heads, head_dim), dtype, device, pad_token=0)
        # [L, 2, T, H, D] views with the buffer's token / head strides.
        chunks.append(flat.unflatten(0, (layers, 2, n)) if n else torch.empty(layers, 2, 0, heads, head_dim,
                                                                              dtype=dtype, device=device))
    total = sum(lengths)
    table = _cos_sin_cache(rotary_dim).to(device)
    src = _positions(draw, total, table.shape[0], index_dtype, device)
    dst = _positions(draw, total, table.shape[0], index_dtype, device)
    paged = draw(st.booleans())
    block_size = draw(st.sampled_from([1, 4, 16])) if paged else 1
    num_slots = total + draw(st.integers(0, 9))
    num_slots = -(-max(num_slots, 1) // block_size) * block_size
    order = draw(st.permutations(range(num_slots)))[:total]
    skip = draw(st.lists(st.booleans(), min_size=total, max_size=total))
    slots = torch.tensor([-1 if s else o for o, s in zip(order, skip)], dtype=index_dtype, device=device)
    shape = (num_slots // block_size, block_size, heads, head_dim) if paged else (num_slots, heads, head_dim)
    k_caches = [torch.randn(shape, device=device).to(dtype) for _ in range(layers)]
    v_caches = [torch.randn(shape, device=device).to(dtype) for _ in range(layers)]
    is_neox = draw(st.booleans())
    return chunks, src, dst, slots, table, is_neox, k_caches, v_caches


def _check_concat(run, case):
    chunks, src, dst, slots, table, is_neox, k_caches, v_caches = case
    k_ref = [c.clone().cpu() for c in k_caches]
    v_ref = [c.clone().cpu() for c in v_caches]
    k64 = [c.double() for c in k_ref]
    reference.fused_kv_concat([c.cpu() for c in chunks], src.cpu(), dst.cpu(), slots.cpu(), table.cpu(), is_neox,
                              k64, v_ref)
    run(chunks, src, dst, slots, table, is_neox, k_caches, v_caches)
    dtype = k_caches[0].dtype
    for layer in range(len(k_caches)):
        assert_close_to_ref(k_caches[layer], k64[layer], dtype, factor=2.0,
                            scale=max(k64[layer].abs().max().item(), 1.0))
        assert torch.equal(v_caches[layer].cpu(), v_ref[layer]), "V must be copied bit for bit, others untouched"


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_fused_kv_concat(device, data):
    case = data.draw(concat_cases(device))
    _check_concat(ops.fused_kv_concat, case)


@EMULATED
@given(case=concat_cases())
def test_fused_kv_concat_emulated(emulated_kernels, case):
    _check_concat(emulated_kernels.fused_kv_concat, case)


# ---------------------------------------------------------------------------------------
# kv_deviation / kv_deviation_out
# ---------------------------------------------------------------------------------------

DEV_RTOL = 2e-5  # fp32 accumulation of exactly representable differences of squares


@st.composite
def deviation_cases(draw, device="cpu"):
    heads, head_dim = draw(st.integers(1, 4)), draw(st.integers(1, 70))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    m = draw(st.integers(0, 20))
    indexed = draw(st.booleans())
    n = draw(st.integers(1, 20)) if indexed else m
    fresh = _tensor(draw, (m, heads, head_dim), dtype, device)
    reused = _tensor(draw, (n, heads, head_dim), dtype, device)
    index = _positions(draw, m, n, draw(st.sampled_from(INDEX_DTYPES)), device) if indexed else None
    accumulate = draw(st.booleans())
    return fresh, reused, index, accumulate


def _check_deviation(run, case):
    fresh, reused, index, accumulate = case
    expected = reference.kv_deviation(fresh.cpu(), reused.cpu(), None if index is None else index.cpu())
    start = torch.rand(fresh.shape[0], dtype=torch.float32, device=fresh.device) if accumulate else None
    out = run(fresh, reused, index, start.clone() if accumulate else None, accumulate)
    if accumulate:
        expected = expected + start.cpu().double()
    a = out.cpu().double()
    assert out.dtype == torch.float32 and a.shape == expected.shape
    assert not torch.isnan(a).any()
    err = ((a - expected).abs() / expected.abs().clamp_min(1e-30)).max().item() if a.numel() else 0.0
    assert err <= DEV_RTOL, f"max relative error {err:.3e}"


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_kv_deviation(device, data):
    case = data.draw(deviation_cases(device))

    def run(fresh, reused, index, out, accumulate):
        return ops.kv_deviation(fresh, reused, index, out=out, accumulate=accumulate)

    _check_deviation(run, case)


@EMULATED
@given(case=deviation_cases())
def test_kv_deviation_emulated(emulated_kernels, case):
    def run(fresh, reused, index, out, accumulate):
        out = poison_(torch.empty(fresh.shape[0])) if out is None else out
        emulated_kernels.kv_deviation(fresh, reused, index, accumulate, out)
        return out

    _check_deviation(run, case)


# ---------------------------------------------------------------------------------------
# select_hkvd / select_hkvd_batched
# ---------------------------------------------------------------------------------------

# Ties, signed zeros and infinities; NaN ordering is covered by test_select.py.
_DEVIATION_VALUES = st.one_of(st.sampled_from([0.0, -0.0, 1.0, 2.0, float("inf"), float("-inf"), 3.4e38]),
                              st.floats(-1e6, 1e6, width=32))


@st.composite
def select_cases(draw, device="cpu"):
    sizes = draw(st.lists(st.integers(0, 40), min_size=1, max_size=4))
    total = sum(sizes)
    deviation = torch.tensor(draw(st.lists(_DEVIATION_VALUES, min_size=total, max_size=total)),
                             dtype=torch.float32, device=device)
    forced = None
    if draw(st.booleans()):
        forced = torch.tensor(draw(st.lists(st.booleans(), min_size=total, max_size=total)), dtype=torch.bool,
                              device=device)
    candidates = None
    if draw(st.booleans()):
        candidates = torch.tensor(draw(st.lists(st.booleans(), min_size=total, max_size=total)), dtype=torch.bool,
                                  device=device)
    ks = draw(st.lists(st.integers(0, 45), min_size=len(sizes), max_size=len(sizes)))
    index_dtype = draw(st.sampled_from(INDEX_DTYPES))
    indptr = torch.tensor([0] + sizes, device=device).cumsum(0).to(index_dtype)
    k = torch.tensor(ks, dtype=draw(st.sampled_from(INDEX_DTYPES)), device=device)
    max_selected = draw(st.integers(0, 45))
    return deviation, indptr, k, forced, candidates, max_selected


def _select_reference(deviation, indptr, k, forced, candidates, max_selected):
    rows, counts = [], []
    for b in range(indptr.shape[0] - 1):
        lo, hi = int(indptr[b]), int(indptr[b + 1])
        sel = reference.select_hkvd(deviation[lo:hi].cpu(), int(k[b]), None if forced is None else forced[lo:hi],
                                    None if candidates is None else candidates[lo:hi])
        counts.append(sel.numel())
        row = torch.full((max_selected,), -1, dtype=torch.int64)
        row[:min(max_selected, sel.numel())] = sel[:max_selected]
        rows.append(row)
    return torch.stack(rows), torch.tensor(counts, dtype=torch.int32)


def _check_select(run, case):
    deviation, indptr, k, forced, candidates, max_selected = case
    indices, counts = run(deviation, indptr, k, forced, candidates, max_selected)
    want_indices, want_counts = _select_reference(deviation, indptr, k, forced, candidates, max_selected)
    assert torch.equal(counts.cpu(), want_counts)
    assert torch.equal(indices.cpu(), want_indices)


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_select_hkvd_batched(device, data):
    _check_select(ops.select_hkvd_batched, data.draw(select_cases(device)))


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_select_hkvd(device, data):
    deviation, indptr, k, forced, candidates, _ = data.draw(select_cases(device))
    n = int(indptr[1])  # the first request alone
    one = (deviation[:n], int(k[0]), None if forced is None else forced[:n],
           None if candidates is None else candidates[:n])
    got = ops.select_hkvd(*one)
    want = reference.select_hkvd(one[0].cpu(), one[1], one[2], one[3])
    assert torch.equal(got.cpu(), want)


@EMULATED
@given(case=select_cases())
def test_select_hkvd_batched_emulated(emulated_kernels, case):
    _check_select(emulated_kernels.select_hkvd_batched, case)


# ---------------------------------------------------------------------------------------
# sparse_query_attention
# ---------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw, device="cpu", head_dims=(8, 16, 24, 32, 40, 64, 128)):
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    head_dim = draw(st.sampled_from(head_dims))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.sampled_from([1, 2, 3, 4]))
    index_dtype = draw(st.sampled_from(INDEX_DTYPES))
    ragged = draw(st.booleans())
    num_requests = draw(st.integers(1, 3)) if ragged else 1
    q_counts = draw(st.lists(st.integers(0, 9), min_size=num_requests, max_size=num_requests))
    kv_counts = draw(st.lists(st.integers(1, 80), min_size=num_requests, max_size=num_requests))
    positions = []
    for qc, kc in zip(q_counts, kv_counts):
        positions += draw(st.lists(st.integers(0, kc - 1), min_size=qc, max_size=qc))
    m, n = sum(q_counts), sum(kv_counts)
    q = _tensor(draw, (m, hq, head_dim), dtype, device)
    k = _tensor(draw, (n, hkv, head_dim), dtype, device)
    v = _tensor(draw, (n, hkv, head_dim), dtype, device)
    q_pos = torch.tensor(positions, dtype=index_dtype, device=device)
    q_indptr = kv_indptr = None
    if ragged:
        q_indptr = torch.tensor([0] + q_counts, device=device).cumsum(0).to(index_dtype)
        kv_indptr = torch.tensor([0] + kv_counts, device=device).cumsum(0).to(index_dtype)
    scale = draw(st.sampled_from([None, 0.05, 0.3]))
    strided_out = draw(st.booleans())
    out = _tensor(draw, q.shape, dtype, device) if strided_out else torch.empty_like(q)
    return q, k, v, q_pos, q_indptr, kv_indptr, scale, poison_(out)


def _check_attention(run, case):
    q, k, v, q_pos, q_indptr, kv_indptr, scale, out = case
    lse = poison_(torch.empty(q.shape[:2], dtype=torch.float32, device=q.device))
    run(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse)
    ref_out, ref_lse = reference.sparse_query_attention(q, k, v, q_pos, scale, q_indptr, kv_indptr)
    # fp16/bf16 kernels round the probabilities to the storage dtype before P @ V.
    assert_close_to_ref(out, ref_out, q.dtype, factor=1.0 if q.dtype == torch.float32 else 2.0,
                        scale=max(ref_out.abs().max().item(), 1.0) if ref_out.numel() else 1.0)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_sparse_query_attention(device, data):
    case = data.draw(attention_cases(device))

    def run(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse):
        raw_ops.sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr,
                                       q.shape[-1] ** -0.5 if scale is None else scale, out, lse)

    _check_attention(run, case)


@EMULATED
@given(case=attention_cases(head_dims=(8, 32, 64, 128)), impl=st.sampled_from(["flash", "flash_s2", "flash_s3", "flash_m32"]),
       tiles_per_split=st.integers(0, 3), num_sms=st.sampled_from([1, 132]))
def test_sparse_query_attention_emulated(emulated_kernels, case, impl, tiles_per_split, num_sms):
    def run(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse):
        emulated_kernels.sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr,
                                                q.shape[-1] ** -0.5 if scale is None else scale, out, lse, impl,
                                                tiles_per_split, num_sms)

    _check_attention(run, case)


# ---------------------------------------------------------------------------------------
# Bad arguments: a valid call with one or two defects drawn from a table per op; the op
# must raise an error that names (one of) the defective arguments, and leave the process
# alive. On the CPU: the metadata checks are one contract for every dispatch key
# (ops/*.h), and index values are checked on the host only there (the CUDA kernels check
# them with device-side asserts, which end the CUDA context).
# ---------------------------------------------------------------------------------------


@dataclass
class Defect:
    argument: str  # the name the error message must contain
    apply: object  # args dict -> None (mutates)


def _retype(dtype):
    return lambda t: t.to(dtype)


def _noncontig_last(t):
    return torch.stack([t, t], dim=-1)[..., 0]


def _bad(arg, fn):
    """A defect that replaces argument `arg` by fn(arg)."""

    def apply(a):
        a[arg] = fn(a[arg])

    return Defect(arg, apply)


def _rope_args():
    table = _cos_sin_cache(16)
    return dict(key=torch.randn(5, 2, 16), src_pos=torch.tensor([0, 1, 2, 3, 4]), dst_pos=torch.tensor([4, 3, 2, 1, 0]),
                cos_sin_cache=table, is_neox=True, out=torch.empty(5, 2, 16))


ROPE_DEFECTS = [
    _bad("key", _retype(torch.float64)),
    _bad("key", lambda t: t[0]),
    _bad("key", _noncontig_last),
    _bad("src_pos", _retype(torch.float32)),
    _bad("src_pos", lambda t: t[:3]),
    _bad("src_pos", lambda t: t.view(5, 1)),
    _bad("dst_pos", _retype(torch.int16)),
    _bad("dst_pos", lambda t: t.int()),
    _bad("src_pos", lambda t: t + 100),
    _bad("dst_pos", lambda t: t - 3),
    _bad("cos_sin_cache", _retype(torch.float16)),
    _bad("cos_sin_cache", lambda t: t[:, :15]),
    _bad("cos_sin_cache", lambda t: torch.cat([t, t], 1)),
    _bad("cos_sin_cache", lambda t: t[0]),
    _bad("out", lambda t: t[:4]),
    _bad("out", _retype(torch.bfloat16)),
    _bad("out", _noncontig_last),
]


def _concat_args():
    chunk = torch.randn(2, 2, 3, 2, 16)
    return dict(chunks=[chunk, chunk.clone()], src_pos=torch.arange(6), dst_pos=torch.arange(6),
                slot_mapping=torch.tensor([0, 1, 2, 3, 4, -1]), cos_sin_cache=_cos_sin_cache(16), is_neox=True,
                k_caches=[torch.zeros(8, 2, 16) for _ in range(2)], v_caches=[torch.zeros(8, 2, 16) for _ in range(2)])


CONCAT_DEFECTS = [
    _bad("chunks", lambda c: [c[0].half(), c[1]]),
    _bad("chunks", lambda c: [c[0][:, :, :, :1], c[1]]),
    _bad("chunks", lambda c: [c[0][0], c[1]]),
    _bad("chunks", lambda c: [_noncontig_last(c[0]), c[1]]),
    _bad("src_pos", lambda t: t[:5]),
    _bad("src_pos", lambda t: t + 60),
    _bad("dst_pos", lambda t: t.int()),
    _bad("dst_pos", lambda t: -t - 1),
    _bad("slot_mapping", lambda t: t.float()),
    _bad("slot_mapping", lambda t: t + 8),
    _bad("slot_mapping", lambda t: torch.tensor([0, 0, 1, 2, 3, 4])),
    _bad("slot_mapping", lambda t: torch.tensor([0, 1, 2, 3, 4, -2])),
    _bad("cos_sin_cache", lambda t: t.double()),
    _bad("cos_sin_cache", lambda t: torch.cat([t, t], 1)),
    _bad("k_caches", lambda c: []),
    _bad("k_caches", lambda c: [c[0], c[1][:4]]),
    _bad("k_caches", lambda c: [c[0].double(), c[1].double()]),
    _bad("k_caches", lambda c: [c[0][None], c[1][None]]),
    _bad("v_caches", lambda c: c[:1]),
    _bad("v_caches", lambda c: [c[0].half(), c[1]]),
]


def _deviation_args():
    return dict(fresh=torch.randn(4, 2, 8), reused=torch.randn(6, 2, 8), token_index=torch.tensor([0, 5, 2, 1]),
                accumulate=False, out=torch.empty(4))


DEVIATION_DEFECTS = [
    _bad("fresh", _retype(torch.int32)),
    _bad("fresh", lambda t: t[0]),
    _bad("fresh", _noncontig_last),
    _bad("reused", _retype(torch.float16)),
    _bad("reused", lambda t: t[:, :1]),
    _bad("reused", _noncontig_last),
    _bad("token_index", lambda t: t[:3]),
    _bad("token_index", _retype(torch.float32)),
    _bad("token_index", lambda t: t + 6),
    _bad("token_index", lambda t: t - 1),
    _bad("out", _retype(torch.float64)),
    _bad("out", lambda t: t[:3]),
    _bad("out", lambda t: torch.empty(8)[::2]),
]


def _select_args():
    return dict(deviation=torch.randn(10), indptr=torch.tensor([0, 4, 10]), k=torch.tensor([2, 3]),
                forced=torch.zeros(10, dtype=torch.bool), candidates=torch.ones(10, dtype=torch.bool), max_selected=5)


SELECT_DEFECTS = [
    _bad("deviation", _retype(torch.float16)),
    _bad("deviation", lambda t: t.view(2, 5)),
    _bad("deviation", lambda t: torch.randn(20)[::2]),
    _bad("indptr", _retype(torch.float32)),
    _bad("indptr", lambda t: t[:0]),
    _bad("indptr", lambda t: torch.tensor([0, 11, 10])),
    _bad("indptr", lambda t: torch.tensor([0, 4, 11])),
    _bad("indptr", lambda t: torch.tensor([-1, 4, 10])),
    _bad("k", lambda t: t[:1]),
    _bad("k", lambda t: -t),
    _bad("k", _retype(torch.float64)),
    _bad("forced", _retype(torch.int64)),
    _bad("forced", lambda t: t[:9]),
    _bad("candidates", _retype(torch.float32)),
    _bad("candidates", lambda t: t.view(2, 5)),
    _bad("max_selected", lambda x: -1),
]


def _attention_args():
    return dict(q=torch.randn(3, 4, 16), k=torch.randn(10, 2, 16), v=torch.randn(10, 2, 16),
                q_pos=torch.tensor([0, 9, 4]), q_indptr=None, kv_indptr=None, scale=0.25,
                out=torch.empty(3, 4, 16), lse=torch.empty(3, 4))


ATTENTION_DEFECTS = [
    _bad("q", _retype(torch.float64)),
    _bad("q", lambda t: t[0]),
    _bad("q", _noncontig_last),
    _bad("k", lambda t: t[:, :, :8]),
    _bad("k", _retype(torch.float16)),
    _bad("v", lambda t: t[:5]),
    _bad("v", _noncontig_last),
    _bad("q_pos", lambda t: t[:2]),
    _bad("q_pos", _retype(torch.float32)),
    _bad("q_pos", lambda t: t + 10),
    _bad("q_pos", lambda t: t - 1),
    _bad("q_indptr", lambda t: torch.tensor([0, 3])),
    Defect("kv_indptr", lambda a: a.update(q_indptr=torch.tensor([0, 3]))),  # one without the other
    _bad("scale", lambda x: float("nan")),
    _bad("out", lambda t: t[:, :2]),
    _bad("out", _retype(torch.bfloat16)),
    _bad("lse", lambda t: t[:2]),
    _bad("lse", _retype(torch.float64)),
]


def _attention_defect_ragged(a):
    a["q_indptr"], a["kv_indptr"] = torch.tensor([0, 2, 3]), torch.tensor([0, 4, 11])


def _attention_defect_q_indptr_end(a):
    a["q_indptr"], a["kv_indptr"] = torch.tensor([0, 2, 2]), torch.tensor([0, 5, 10])


def _attention_defect_q_indptr_order(a):
    a["q_indptr"], a["kv_indptr"] = torch.tensor([0, 4, 3]), torch.tensor([0, 10, 10])


ATTENTION_DEFECTS += [Defect("kv_indptr", _attention_defect_ragged), Defect("q_indptr", _attention_defect_q_indptr_end),
                      Defect("q_indptr", _attention_defect_q_indptr_order)]


def _paged_attention_args():
    # Two requests of 5 and 9 keys on pages of 4 (2 + 3 pages of 6).
    return dict(q=torch.randn(3, 4, 16), k_cache=torch.randn(6, 4, 2, 16), v_cache=torch.randn(6, 4, 2, 16),
                q_pos=torch.tensor([4, 0, 8]), q_indptr=torch.tensor([0, 1, 3]), kv_indptr=torch.tensor([0, 2, 5]),
                kv_indices=torch.tensor([5, 0, 3, 1, 2]), kv_last_page_len=torch.tensor([1, 1]), scale=0.25,
                out=torch.empty(3, 4, 16), lse=torch.empty(3, 4))


PAGED_ATTENTION_DEFECTS = [
    _bad("q", _retype(torch.float64)),
    _bad("q", lambda t: t[0]),
    _bad("q", _noncontig_last),
    _bad("k_cache", lambda t: t[0]),
    _bad("k_cache", _retype(torch.float16)),
    _bad("k_cache", lambda t: t[..., :8]),
    _bad("v_cache", lambda t: t[:5]),
    _bad("v_cache", _noncontig_last),
    _bad("q_pos", lambda t: t[:2]),
    _bad("q_pos", _retype(torch.float32)),
    _bad("q_pos", lambda t: t + 10),
    _bad("q_indptr", lambda t: torch.tensor([0, 1, 4])),
    _bad("q_indptr", lambda t: t.view(3, 1)),
    _bad("kv_indptr", lambda t: torch.tensor([0, 2, 6])),
    _bad("kv_indptr", lambda t: torch.tensor([0, 3, 2])),
    _bad("kv_indptr", _retype(torch.float32)),
    _bad("kv_indices", lambda t: t + 6),
    _bad("kv_indices", lambda t: -t - 1),
    _bad("kv_indices", lambda t: t.view(5, 1)),
    _bad("kv_last_page_len", lambda t: t[:1]),
    _bad("kv_last_page_len", lambda t: torch.tensor([0, 1])),
    _bad("kv_last_page_len", lambda t: torch.tensor([5, 1])),
    _bad("scale", lambda x: float("inf")),
    _bad("out", lambda t: t[:, :2]),
    _bad("out", _retype(torch.bfloat16)),
    _bad("lse", lambda t: t[:2]),
    _bad("lse", _retype(torch.float64)),
]


def _call_rope(a):
    ops.rope_reposition(a["key"], a["src_pos"], a["dst_pos"], a["cos_sin_cache"], a["is_neox"], out=a["out"])


def _call_rope_inplace(a):
    ops.rope_reposition(a["key"], a["src_pos"], a["dst_pos"], a["cos_sin_cache"], a["is_neox"])


def _call_concat(a):
    ops.fused_kv_concat(a["chunks"], a["src_pos"], a["dst_pos"], a["slot_mapping"], a["cos_sin_cache"], a["is_neox"],
                        a["k_caches"], a["v_caches"])


def _call_deviation(a):
    ops.kv_deviation(a["fresh"], a["reused"], a["token_index"], out=a["out"], accumulate=a["accumulate"])


def _call_deviation_functional(a):
    ops.kv_deviation(a["fresh"], a["reused"], a["token_index"])


def _call_select(a):
    ops.select_hkvd_batched(a["deviation"], a["indptr"], a["k"], a["forced"], a["candidates"], a["max_selected"])


def _call_attention(a):
    raw_ops.sparse_query_attention(a["q"], a["k"], a["v"], a["q_pos"], a["q_indptr"], a["kv_indptr"], a["scale"],
                                   a["out"], a["lse"])


def _call_paged_attention(a):
    raw_ops.sparse_query_attention_paged(a["q"], a["k_cache"], a["v_cache"], a["q_pos"], a["q_indptr"], a["kv_indptr"],
                                         a["kv_indices"], a["kv_last_page_len"], a["scale"], a["out"], a["lse"])


BAD_CASES = {
    "rope_reposition_out": (_rope_args, ROPE_DEFECTS, _call_rope),
    "rope_reposition": (_rope_args, [d for d in ROPE_DEFECTS if d.argument != "out"], _call_rope_inplace),
    "fused_kv_concat": (_concat_args, CONCAT_DEFECTS, _call_concat),
    "kv_deviation_out": (_deviation_args, DEVIATION_DEFECTS, _call_deviation),
    "kv_deviation": (_deviation_args, [d for d in DEVIATION_DEFECTS if d.argument != "out"],
                     _call_deviation_functional),
    "select_hkvd_batched": (_select_args, SELECT_DEFECTS, _call_select),
    "sparse_query_attention": (_attention_args, ATTENTION_DEFECTS, _call_attention),
    "sparse_query_attention_paged": (_paged_attention_args, PAGED_ATTENTION_DEFECTS, _call_paged_attention),
}


@pytest.mark.parametrize("op", list(BAD_CASES))
def test_valid_baseline_calls_pass(op):
    """The unmutated calls of the bad-argument tests are valid (so each defect is the cause)."""
    make, _, call = BAD_CASES[op]
    call(make())


@pytest.mark.parametrize("op", list(BAD_CASES))
@given(data=st.data())
def test_bad_arguments_rejected(op, data):
    make, defects, call = BAD_CASES[op]
    chosen = data.draw(st.lists(st.sampled_from(range(len(defects))), min_size=1, max_size=2, unique=True))
    names = [defects[i].argument for i in chosen]
    assume(len(set(names)) == len(names))  # two defects of one argument may undo each other
    args = make()
    for i in chosen:
        defects[i].apply(args)
    with pytest.raises((RuntimeError, ValueError)) as info:
        call(args)
    message = str(info.value)
    assert any(re.search(rf"\b{re.escape(name)}", message) for name in names), (names, message)


@pytest.mark.parametrize("op", list(BAD_CASES))
def test_every_defect_is_rejected(op):
    """Each defect of the table alone (the random test draws pairs too)."""
    make, defects, call = BAD_CASES[op]
    for defect in defects:
        args = make()
        defect.apply(args)
        with pytest.raises((RuntimeError, ValueError)) as info:
            call(args)
        assert re.search(rf"\b{re.escape(defect.argument)}", str(info.value)), (defect.argument, str(info.value))
