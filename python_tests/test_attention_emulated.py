"""The CUDA attention kernels, compiled for the host and run unchanged in the CUDA
emulator (csrc/emulation/), against the same float64 reference as test_attention.py.

This covers the kernels' index math, mma / ldmatrix fragment layouts, barriers, key splits
with their combine kernel and the cp.async double buffer on every machine, GPU or not.
The emulator's mma / shuffle semantics are cross-checked by mma_v1 and simt, which also
pass test_attention.py on an H100; what it cannot show is timing or memory-ordering races.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DTYPES, poison_
from test_attention import CASES, _check, _inputs, _positions

IMPLS = ["mma_v1", "split", "split_sync"]
HALF_DTYPES = [torch.float16, torch.bfloat16]
# test_attention.py's shapes, less the largest (600 x 4099: about 40 s per run here).
EMULATED_CASES = [c for c in CASES if c[0] * c[1] <= 600 * 512]


def _run(emulated, impl, q, k, v, pos, scale=None, q_indptr=None, kv_indptr=None, splits=0, out=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = poison_(torch.empty_like(q)) if out is None else out
    lse = poison_(torch.empty(q.shape[:2], dtype=torch.float32))
    emulated.sparse_query_attention(q, k, v, pos, q_indptr, kv_indptr, scale, out, lse, impl, splits)
    return out, lse


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: "M{}-N{}-Hq{}-Hkv{}-D{}".format(*c))
def test_matches_reference(emulated_kernels, impl, dtype, case):
    m, n, hq, hkv, d = case
    q, k, v = _inputs(m, n, hq, hkv, d, dtype, "cpu")
    pos = _positions(m, n, False, "cpu")
    out, lse = _run(emulated_kernels, impl, q, k, v, pos)
    _check(out, lse, q, k, v, pos)


@pytest.mark.parametrize("impl", ["split", "split_sync"])
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_key_splits(emulated_kernels, impl, splits):
    """Any split count gives the same result, including splits wholly past some rows'
    positions (their partials are never written) and more splits than key tiles."""
    q, k, v = _inputs(40, 450, 8, 2, 64, torch.bfloat16, "cpu")
    pos = _positions(40, 450, True, "cpu")
    out, lse = _run(emulated_kernels, impl, q, k, v, pos, splits=splits)
    _check(out, lse, q, k, v, pos)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_ragged_batch(emulated_kernels, impl, index_dtype):
    # Requests of 13, 0, 30 and 1 queries against 40, 25, 300 and 1 keys: boundaries fall
    # inside row tiles, and the empty request still owns keys.
    q_counts, kv_counts = [13, 0, 30, 1], [40, 25, 300, 1]
    q, k, v = _inputs(sum(q_counts), sum(kv_counts), 8, 2, 128, torch.float16, "cpu")
    pos = torch.cat([_positions(c, kv, False, "cpu") for c, kv in zip(q_counts, kv_counts)]).to(index_dtype)
    q_indptr = torch.tensor([0] + q_counts).cumsum(0).to(index_dtype)
    kv_indptr = torch.tensor([0] + kv_counts).cumsum(0).to(index_dtype)
    out, lse = _run(emulated_kernels, impl, q, k, v, pos, 0.2, q_indptr, kv_indptr, splits=2 if impl != "mma_v1" else 0)
    _check(out, lse, q, k, v, pos, 0.2, q_indptr, kv_indptr)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs_and_output(emulated_kernels, impl):
    """q, k, v sliced out of fused projections; out written into a wider buffer."""
    m, n, hq, hkv, d = 21, 300, 6, 2, 64
    qkv = torch.randn(n, hq + 2 * hkv + 1, d, dtype=torch.bfloat16)
    q, k, v = qkv[:m, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:hq + 2 * hkv]
    pos = _positions(m, n, False, "cpu")
    wide = poison_(torch.empty(m, hq + 3, d, dtype=torch.bfloat16))
    out, lse = _run(emulated_kernels, impl, q, k, v, pos, out=wide[:, 1:hq + 1])
    _check(out, lse, q, k, v, pos)
    assert wide[:, 0].isnan().all() and wide[:, hq + 1:].isnan().all(), "wrote outside out"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 64])
def test_simt_kernel(emulated_kernels, dtype, d):
    """The SIMT kernel (fp32, other head dims, unaligned inputs, CACHEBLEND_ATTENTION_IMPL=simt)."""
    q, k, v = _inputs(9, 200, 6, 2, d, dtype, "cpu")
    pos = _positions(9, 200, False, "cpu")
    out, lse = _run(emulated_kernels, "simt", q, k, v, pos, 0.3)
    _check(out, lse, q, k, v, pos, 0.3)


def test_device_checks_reach_the_caller(emulated_kernels):
    """A position outside its request trips the kernel's device-side check."""
    q, k, v = _inputs(3, 10, 2, 1, 64, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="q_pos outside its request"):
        _run(emulated_kernels, "split", q, k, v, torch.tensor([0, 10, 2]))
