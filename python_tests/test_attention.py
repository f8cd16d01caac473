"""sparse_query_attention against the float64 reference (explicit boolean mask)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cacheblend_ext import ops, reference
from conftest import DTYPES, HAS_CUDA, assert_close_to_ref, poison_

_cuda_skip = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or CUDA kernels not built)")


def _has_attention_variants() -> bool:
    """Whether this build has the attention kernel's benchmarking variants
    (CACHEBLEND_ATTENTION_VARIANTS=1 at build time)."""
    if not HAS_CUDA:
        return False
    try:
        with ops.attention_kernel("flash_s2"):
            return True
    except RuntimeError:
        return False


_variants_skip = pytest.mark.skipif(not _has_attention_variants(),
                                    reason="no CUDA device, or a build without CACHEBLEND_ATTENTION_VARIANTS=1")

# (device, CUDA kernel choice): CUDA runs every case through the default dispatch (the
# flash kernel for fp16/bf16 with head_dim 64/128, with its planned key split and with a
# small fixed one, so the combine kernel runs on every shape), the benchmarking variants
# when built, and the SIMT kernel.
TARGETS = [
    pytest.param(("cpu", None), id="cpu"),
    pytest.param(("cuda", None), id="cuda", marks=_cuda_skip),
    pytest.param(("cuda", ("flash", 2)), id="cuda-flash-split2", marks=_cuda_skip),
    pytest.param(("cuda", ("flash_m32", 2)), id="cuda-flash-m32-split2", marks=_variants_skip),
    pytest.param(("cuda", ("flash_s2", 3)), id="cuda-flash-s2-split3", marks=_variants_skip),
    pytest.param(("cuda", ("flash_s3", 1)), id="cuda-flash-s3-split1", marks=_variants_skip),
    pytest.param(("cuda", ("simt", 0)), id="cuda-simt", marks=_cuda_skip),
]

# (M, N, Hq, Hkv, D): the sizes, GQA ratios 1, 3, 4, 8 and both head dims.
CASES = [
    (1, 1, 4, 4, 64),
    (5, 17, 3, 1, 64),
    (64, 17, 8, 2, 128),  # more queries than keys: duplicate positions
    (64, 512, 8, 1, 128),
    (600, 512, 4, 1, 64),
    (5, 4099, 8, 8, 128),
    (600, 4099, 8, 2, 64),
    (1, 4099, 3, 1, 128),
]


@pytest.fixture
def target(request):
    device, kernel = request.param
    if kernel is None:
        yield device
    else:
        with ops.attention_kernel(*kernel):
            yield device


def _positions(m: int, n: int, sort: bool, device) -> torch.Tensor:
    """Random positions in [0, n) with the first query at position 0; duplicates when m > n."""
    if m <= n:
        pos = torch.randperm(n)[:m]
    else:
        pos = torch.randint(0, n, (m,))
    if m:
        pos[torch.argmin(pos)] = pos[0].clone()
        pos[0] = 0
    if sort:
        pos = pos.sort().values
    return pos.to(device)


def _inputs(m, n, hq, hkv, d, dtype, device):
    q = torch.randn(m, hq, d, dtype=dtype, device=device)
    k = torch.randn(n, hkv, d, dtype=dtype, device=device)
    v = torch.randn(n, hkv, d, dtype=dtype, device=device)
    return q, k, v


def _check(out, lse, q, k, v, pos, scale=None, q_indptr=None, kv_indptr=None):
    ref_out, ref_lse = reference.sparse_query_attention(q, k, v, pos, scale, q_indptr, kv_indptr)
    # fp16/bf16 kernels round the probabilities to the storage dtype before P @ V.
    factor = 1.0 if q.dtype == torch.float32 else 2.0
    assert_close_to_ref(out, ref_out, q.dtype, factor=factor)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("target", TARGETS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-Hq{}-Hkv{}-D{}".format(*c))
@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "unsorted"])
def test_matches_reference(target, dtype, case, sort):
    m, n, hq, hkv, d = case
    q, k, v = _inputs(m, n, hq, hkv, d, dtype, target)
    pos = _positions(m, n, sort, target)
    out = poison_(torch.empty_like(q))
    res, lse = ops.sparse_query_attention(q, k, v, pos, out=out, return_lse=True)
    assert res is out
    _check(out, lse, q, k, v, pos)


@pytest.mark.parametrize("target", TARGETS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 96])
def test_other_head_dims(target, dtype, d):
    """Head dims other than 64 / 128 take the SIMT path on CUDA."""
    q, k, v = _inputs(37, 300, 6, 2, d, dtype, target)
    pos = _positions(37, 300, True, target)
    out, lse = ops.sparse_query_attention(q, k, v, pos, 0.3, return_lse=True)
    _check(out, lse, q, k, v, pos, 0.3)


@pytest.mark.parametrize("target", TARGETS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_ragged_batch(target, dtype, index_dtype):
    # Requests of 13, 0 (no queries), 70 and 1 queries against 40, 25, 700 and 1 keys:
    # boundaries fall inside query tiles, and the empty request still owns keys.
    q_counts, kv_counts = [13, 0, 70, 1], [40, 25, 700, 1]
    hq, hkv, d = 8, 2, 128
    m, n = sum(q_counts), sum(kv_counts)
    q, k, v = _inputs(m, n, hq, hkv, d, dtype, target)
    pos = torch.cat([_positions(c, kv, False, "cpu") for c, kv in zip(q_counts, kv_counts)]).to(target, index_dtype)
    q_indptr = torch.tensor([0] + q_counts, dtype=index_dtype).cumsum(0).to(target, index_dtype)
    kv_indptr = torch.tensor([0] + kv_counts, dtype=index_dtype).cumsum(0).to(target, index_dtype)
    out = poison_(torch.empty_like(q))
    lse = ops.sparse_query_attention(q, k, v, pos, q_indptr=q_indptr, kv_indptr=kv_indptr, out=out,
                                     return_lse=True)[1]
    _check(out, lse, q, k, v, pos, None, q_indptr.cpu(), kv_indptr.cpu())


@pytest.mark.parametrize("target", TARGETS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_strided_inputs_and_output(target, dtype, d):
    """q, k, v sliced out of fused projections, out and lse written into wider buffers."""
    m, n, hq, hkv = 45, 333, 8, 2
    fused_q = torch.randn(m, hq + 3, d, dtype=dtype, device=target)
    fused_kv = torch.randn(n, 2 * hkv + 1, d, dtype=dtype, device=target)
    q, k, v = fused_q[:, 1:hq + 1], fused_kv[:, :hkv], fused_kv[:, hkv + 1:]
    pos = _positions(m, n, False, target).to(torch.int32)
    out_buf = poison_(torch.empty(m, hq + 2, d, dtype=dtype, device=target))
    out = out_buf[:, 2:]
    lse_buf = poison_(torch.empty(hq, 2 * m, dtype=torch.float32, device=target))
    lse = lse_buf[:, ::2].t()
    torch.ops.cacheblend.sparse_query_attention(q, k, v, pos, None, None, d ** -0.5, out, lse)
    _check(out, lse, q, k, v, pos)
    assert torch.isnan(out_buf[:, :2]).all() and torch.isnan(lse_buf[:, 1::2]).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_cuda_skip)])
def test_opcheck(device):
    q, k, v = _inputs(7, 50, 4, 2, 64, torch.float32, device)
    pos = _positions(7, 50, False, device)
    out = torch.empty_like(q)
    lse = torch.empty(7, 4, device=device)
    torch.library.opcheck(torch.ops.cacheblend.sparse_query_attention.default,
                          (q, k, v, pos, None, None, 0.125, out, lse))
    q_indptr = torch.tensor([0, 3, 7], device=device)
    kv_indptr = torch.tensor([0, 20, 50], device=device)
    pos = torch.tensor([0, 19, 5, 0, 29, 3, 3], device=device)
    torch.library.opcheck(torch.ops.cacheblend.sparse_query_attention.default,
                          (q, k, v, pos, q_indptr, kv_indptr, 0.125, out, None))


def test_empty_queries():
    q, k, v = _inputs(0, 10, 4, 2, 64, torch.float32, "cpu")
    out, lse = ops.sparse_query_attention(q, k, v, torch.zeros(0, dtype=torch.long), return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_cuda_skip)])
def test_argument_errors(device):
    q, k, v = _inputs(4, 10, 4, 2, 64, torch.float32, device)
    pos = torch.tensor([0, 3, 9, 2], device=device)
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        ops.sparse_query_attention(q, k[:, :1].expand(10, 3, 64), v[:, :1].expand(10, 3, 64), pos)
    with pytest.raises(RuntimeError, match="head_dim 100 is not supported"):
        ops.sparse_query_attention(torch.randn(4, 4, 100, device=device), torch.randn(10, 2, 100, device=device),
                                   torch.randn(10, 2, 100, device=device), pos)
    with pytest.raises(RuntimeError, match="k head_dim"):
        ops.sparse_query_attention(q, k[..., :32], v[..., :32], pos)
    with pytest.raises(RuntimeError, match="v must have the shape of k"):
        ops.sparse_query_attention(q, k, v[:5], pos)
    with pytest.raises(RuntimeError, match="k must have the dtype of q"):
        ops.sparse_query_attention(q, k.half(), v.half(), pos)
    with pytest.raises(RuntimeError, match="q_pos must have one entry per query"):
        ops.sparse_query_attention(q, k, v, pos[:3])
    with pytest.raises(RuntimeError, match="q_pos must be int32 or int64"):
        ops.sparse_query_attention(q, k, v, pos.float())
    with pytest.raises(RuntimeError, match="given together"):
        ops.sparse_query_attention(q, k, v, pos, q_indptr=torch.tensor([0, 4], device=device))
    with pytest.raises(RuntimeError, match="out must have the dtype of q"):
        ops.sparse_query_attention(q, k, v, pos, out=torch.empty_like(q, dtype=torch.half))
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        ops.sparse_query_attention(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, pos)


def test_value_errors_cpu():
    """Index values are checked on the host on CPU (CUDA checks them with device asserts)."""
    q, k, v = _inputs(4, 10, 4, 2, 64, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"q_pos\[2\] = 10 is outside request 0's keys \[0, 10\)"):
        ops.sparse_query_attention(q, k, v, torch.tensor([0, 3, 10, 2]))
    with pytest.raises(RuntimeError, match=r"q_pos\[1\] = -1 is outside"):
        ops.sparse_query_attention(q, k, v, torch.tensor([0, -1, 1, 2]))
    # Position 5 exists in the batch but not in request 1 (keys 6..9, length 4).
    with pytest.raises(RuntimeError, match=r"q_pos\[3\] = 5 is outside request 1's keys \[0, 4\)"):
        ops.sparse_query_attention(q, k, v, torch.tensor([0, 3, 1, 5]), q_indptr=torch.tensor([0, 3, 4]),
                                   kv_indptr=torch.tensor([0, 6, 10]))
    with pytest.raises(RuntimeError, match="q_indptr must start at 0 and end at num_queries"):
        ops.sparse_query_attention(q, k, v, torch.tensor([0, 3, 1, 2]), q_indptr=torch.tensor([0, 3]),
                                   kv_indptr=torch.tensor([0, 10]))
    with pytest.raises(RuntimeError, match="kv_indptr must be non-decreasing"):
        ops.sparse_query_attention(q, k, v, torch.tensor([0, 3, 1, 2]), q_indptr=torch.tensor([0, 4]),
                                   kv_indptr=torch.tensor([0, 11]))


def test_cpu_memory_stays_bounded():
    """N = 32k keys, M = 1k queries: peak RSS grows by far less than one M x N fp32 matrix
    (128 MiB per head), so no M x N buffer is ever allocated."""
    script = textwrap.dedent("""
        import resource, torch
        from cacheblend_ext import ops, reference
        torch.manual_seed(0)
        torch.set_num_threads(2)
        m, n, hq, hkv, d = 1024, 32768, 4, 1, 64
        q = torch.randn(m, hq, d); k = torch.randn(n, hkv, d); v = torch.randn(n, hkv, d)
        pos = torch.randperm(n)[:m].sort().values
        out = torch.empty_like(q); lse = torch.empty(m, hq)
        small = slice(0, 8)
        ops.sparse_query_attention(q[small], k, v, pos[small])  # warm-up: libraries, thread pool
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        torch.ops.cacheblend.sparse_query_attention(q, k, v, pos, None, None, d ** -0.5, out, lse)
        growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        idx = torch.tensor([0, 1, 500, 1023])
        ref_out, _ = reference.sparse_query_attention(q[idx], k, v, pos[idx])
        err = (out[idx].double() - ref_out).abs().max().item()
        print(growth_mib, err)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    growth_mib, err = map(float, res.stdout.split()[-2:])
    assert err < 1e-4
    assert growth_mib < 48, f"peak RSS grew by {growth_mib:.1f} MiB"
