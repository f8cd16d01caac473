"""The CUDA attention kernels, compiled for the host and run unchanged in the CUDA
emulator (csrc/emulation/), against the same float64 reference as test_attention.py.

This covers the kernels' index math, mma / ldmatrix fragment layouts, swizzled shared
memory, barriers, key splits with their combine kernel and the cp.async pipeline on every
machine, GPU or not. The emulator's mma / ldmatrix / cp.async semantics are cross-checked by the flash kernels
and simt, which also pass test_attention.py on an H200; what it cannot show is timing.
Mutation tests disable each barrier and cp.async wait of the flash kernel in turn and
require a test case to fail without it.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from conftest import DTYPES, poison_
from test_attention import CASES, _check, _inputs, _positions

IMPLS = ["flash", "flash_s2", "flash_s3", "flash_m32"]
HALF_DTYPES = [torch.float16, torch.bfloat16]
# test_attention.py's shapes, less the largest (600 x 4099: minutes per run here).
EMULATED_CASES = [c for c in CASES if c[0] * c[1] <= 600 * 512]
FLASH = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "kernels" / "attention" / "flash.cuh"


def _run(emulated, impl, q, k, v, pos, scale=None, q_indptr=None, kv_indptr=None, tiles_per_split=0, num_sms=132,
         out=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = poison_(torch.empty_like(q)) if out is None else out
    lse = poison_(torch.empty(q.shape[:2], dtype=torch.float32))
    emulated.sparse_query_attention(q, k, v, pos, q_indptr, kv_indptr, scale, out, lse, impl, tiles_per_split, num_sms)
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


@pytest.mark.parametrize("impl", ["flash", "flash_s2", "flash_s3", "flash_m32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("tiles_per_split", [1, 2, 3, 7])
def test_key_splits(emulated_kernels, tiles_per_split, d, impl):
    """Any key split gives the same result: rows that see one split (written directly)
    beside rows that see several (merged by the combine kernel), splits wholly past some
    row tiles, and a last split that takes the remaining tiles."""
    q, k, v = _inputs(40, 450, 8, 2, d, torch.bfloat16, "cpu")
    pos = _positions(40, 450, True, "cpu")
    out, lse = _run(emulated_kernels, impl, q, k, v, pos, tiles_per_split=tiles_per_split)
    _check(out, lse, q, k, v, pos)


@pytest.mark.parametrize("num_sms", [1, 8, 132])
def test_planned_splits(emulated_kernels, num_sms):
    """The split the host plans from the SM count (one split on a small device, several on
    a large one) computes the same function."""
    q, k, v = _inputs(30, 900, 4, 1, 64, torch.float16, "cpu")
    pos = _positions(30, 900, True, "cpu")
    out, lse = _run(emulated_kernels, "flash", q, k, v, pos, num_sms=num_sms)
    _check(out, lse, q, k, v, pos)


def _ragged(index_dtype=torch.int64, d=128):
    # Requests of 13, 0, 30 and 1 queries against 40, 25, 300 and 1 keys: boundaries fall
    # inside row tiles, and the empty request still owns keys.
    q_counts, kv_counts = [13, 0, 30, 1], [40, 25, 300, 1]
    q, k, v = _inputs(sum(q_counts), sum(kv_counts), 8, 2, d, torch.float16, "cpu")
    pos = torch.cat([_positions(c, kv, False, "cpu") for c, kv in zip(q_counts, kv_counts)]).to(index_dtype)
    q_indptr = torch.tensor([0] + q_counts).cumsum(0).to(index_dtype)
    kv_indptr = torch.tensor([0] + kv_counts).cumsum(0).to(index_dtype)
    return q, k, v, pos, q_indptr, kv_indptr


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_ragged_batch(emulated_kernels, impl, index_dtype):
    q, k, v, pos, q_indptr, kv_indptr = _ragged(index_dtype)
    out, lse = _run(emulated_kernels, impl, q, k, v, pos, 0.2, q_indptr, kv_indptr, tiles_per_split=2)
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
    """The SIMT kernel (fp32, other head dims, unaligned inputs, impl="simt")."""
    q, k, v = _inputs(9, 200, 6, 2, d, dtype, "cpu")
    pos = _positions(9, 200, False, "cpu")
    out, lse = _run(emulated_kernels, "simt", q, k, v, pos, 0.3)
    _check(out, lse, q, k, v, pos, 0.3)


def test_misaligned_output_takes_the_simt_kernel(emulated_kernels):
    """An output whose rows are not 16-byte aligned cannot take the tensor-core epilogue's
    vector stores: the dispatch falls back to the SIMT kernel, same results."""
    q, k, v = _inputs(9, 100, 4, 2, 64, torch.float16, "cpu")
    pos = _positions(9, 100, False, "cpu")
    wide = poison_(torch.empty(9 * 4 * 64 + 1, dtype=torch.float16))
    out = wide[1:].view(9, 4, 64)
    out, lse = _run(emulated_kernels, "flash", q, k, v, pos, out=out)
    _check(out, lse, q, k, v, pos)


def test_device_checks_reach_the_caller(emulated_kernels):
    """A position outside its request trips the kernel's device-side check."""
    q, k, v = _inputs(3, 10, 2, 1, 64, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="q_pos outside its request"):
        _run(emulated_kernels, "flash", q, k, v, torch.tensor([0, 10, 2]))


# ------------------------------------------------------------------- mutation tests

def _sync_sites():
    """(line, text) of every barrier and cp.async wait in the flash kernel."""
    sites = []
    for number, line in enumerate(FLASH.read_text().splitlines(), start=1):
        if re.search(r"__syncthreads\(\)|__syncwarp\(\)|cp_async_wait<", line):
            sites.append((number, line.strip()))
    return sites


def _mutation_cases():
    """Small cases that together exercise every synchronisation of the flash kernel, in
    both shapes: several key tiles per block, key splits, both head dims, a ragged batch
    whose row tiles span requests."""
    for impl in ("flash", "flash_s2", "flash_s3", "flash_m32"):
        yield f"{impl}, one request, D=64", lambda e, i=impl: _run_checked(e, i, *_single(60, 300, 64))
        yield f"{impl}, D=128, splits", lambda e, i=impl: _run_checked(e, i, *_single(40, 450, 128), tiles_per_split=2)
        q, k, v, pos, q_indptr, kv_indptr = _ragged(d=64)
        yield f"{impl}, ragged", lambda e, i=impl: _run_checked(e, i, q, k, v, pos, q_indptr=q_indptr,
                                                                kv_indptr=kv_indptr, tiles_per_split=3)


def _single(m, n, d):
    q, k, v = _inputs(m, n, 8, 2, d, torch.bfloat16, "cpu")
    return q, k, v, _positions(m, n, True, "cpu")


def _run_checked(emulated, impl, q, k, v, pos, q_indptr=None, kv_indptr=None, tiles_per_split=0):
    out, lse = _run(emulated, impl, q, k, v, pos, q_indptr=q_indptr, kv_indptr=kv_indptr,
                    tiles_per_split=tiles_per_split)
    _check(out, lse, q, k, v, pos, None, q_indptr, kv_indptr)


def test_mutation_cases_pass(emulated_kernels):
    """The mutation tests' cases pass with every synchronisation in place (so a failure
    below is the mutation's doing)."""
    for _, case in _mutation_cases():
        case(emulated_kernels)


@pytest.mark.parametrize("site", _sync_sites(), ids=lambda s: f"line{s[0]}")
def test_every_synchronisation_is_needed(emulated_kernels, site):
    line, text = site
    failures = []
    emulated_kernels.disable_sync_at(str(FLASH.relative_to(FLASH.parents[2])), line)
    try:
        for name, case in _mutation_cases():
            try:
                case(emulated_kernels)
            except (AssertionError, RuntimeError) as exc:
                failures.append(f"{name}: {str(exc).splitlines()[0][:120]}")
    finally:
        emulated_kernels.disable_sync_at("", 0)
    assert failures, f"no test case fails without `{text}` (flash.cuh:{line})"


def test_sync_sites_found():
    """The mutation tests see the flash kernel's barriers and waits (guards the regex)."""
    texts = [text for _, text in _sync_sites()]
    assert sum("__syncthreads" in t for t in texts) >= 4
    assert sum("cp_async_wait" in t for t in texts) >= 2
    assert any("__syncwarp" in t for t in texts)
