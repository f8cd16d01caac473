"""kv_deviation and HKVD top-k selection vs the float64 references."""

from __future__ import annotations

import pytest
import torch

from cacheblend_ext import ops, reference
from helpers import DEVICES, DTYPES, HAS_CUDA, assert_deviation_close, poison_, selection_masks, strided

SIZES = [1, 7, 65, 1000, 4096, 16384]

# ---------------------------------------------------------------------------
# kv_deviation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", SIZES)
def test_kv_deviation_sizes(device, dtype, num_tokens):
    heads, dim = (2, 64) if num_tokens > 1000 else (3, 40)
    fresh = torch.randn(num_tokens, heads, dim, device=device).to(dtype)
    reused = (fresh.float() + 0.3 * torch.randn_like(fresh, dtype=torch.float32)).to(dtype)
    out = ops.kv_deviation(fresh, reused)
    assert out.shape == (num_tokens,) and out.device == fresh.device
    assert_deviation_close(out, reference.kv_deviation(fresh.cpu(), reused.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 8, 128), (17, 1, 36), (9, 5, 12), (5, 2, 3)])
def test_kv_deviation_shapes_and_strides(device, dtype, shape):
    # (17, 1, 36), (9, 5, 12), (5, 2, 3) miss the 16-byte vector path for some dtypes.
    fresh = torch.randn(*shape, device=device).to(dtype)
    reused = torch.randn(*shape, device=device).to(dtype)
    ref = reference.kv_deviation(fresh.cpu(), reused.cpu())
    for f, r in [(fresh, reused), (strided(fresh), reused), (fresh, strided(reused, 2, 3)),
                 (strided(fresh, 1, 1), strided(reused))]:
        out = poison_(torch.empty(shape[0], device=device))
        ops.kv_deviation(f, r, out=out)
        assert_deviation_close(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_kv_deviation_token_index(device, dtype, index_dtype):
    n, m = 300, 77
    reused = torch.randn(n, 4, 64, device=device).to(dtype)
    token_index = torch.randperm(n, device=device)[:m].sort().values.to(index_dtype)
    token_index[3] = token_index[4]  # repeated rows are allowed
    fresh = torch.randn(m, 4, 64, device=device).to(dtype)
    out = ops.kv_deviation(fresh, strided(reused), token_index)
    assert_deviation_close(out, reference.kv_deviation(fresh.cpu(), reused.cpu(), token_index.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_deviation_accumulate_k_plus_v(device, dtype):
    n = 129
    fk, rk, fv, rv = (torch.randn(n, 2, 64, device=device).to(dtype) for _ in range(4))
    out = poison_(torch.empty(n, device=device))
    ops.kv_deviation(fk, rk, out=out)
    ops.kv_deviation(fv, rv, out=out, accumulate=True)
    ref = reference.kv_deviation(fk.cpu(), rk.cpu()) + reference.kv_deviation(fv.cpu(), rv.cpu())
    assert_deviation_close(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_deviation_empty(device):
    fresh = torch.randn(0, 2, 8, device=device)
    assert ops.kv_deviation(fresh, fresh).shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_deviation_opcheck(device):
    fresh = torch.randn(11, 2, 16, device=device, dtype=torch.bfloat16)
    reused = torch.randn(20, 2, 16, device=device, dtype=torch.bfloat16)
    idx = torch.randint(0, 20, (11,), device=device)
    torch.library.opcheck(torch.ops.cacheblend.kv_deviation.default, (fresh, reused[:11], None))
    torch.library.opcheck(torch.ops.cacheblend.kv_deviation.default, (fresh, reused, idx))
    out = torch.rand(11, device=device)
    torch.library.opcheck(torch.ops.cacheblend.kv_deviation_out.default, (fresh, reused, idx, True), {"out": out})


@pytest.mark.parametrize("device", DEVICES)
def test_kv_deviation_errors(device):
    fresh = torch.randn(8, 2, 16, device=device)
    with pytest.raises(RuntimeError, match="reused must have the heads"):
        ops.kv_deviation(fresh, torch.randn(8, 3, 16, device=device))
    with pytest.raises(RuntimeError, match="same number of tokens"):
        ops.kv_deviation(fresh, torch.randn(9, 2, 16, device=device))
    with pytest.raises(RuntimeError, match="reused must have the dtype"):
        ops.kv_deviation(fresh, fresh.half())
    with pytest.raises(RuntimeError, match="fresh must be float16, bfloat16 or float32"):
        ops.kv_deviation(fresh.long(), fresh.long())
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        ops.kv_deviation(fresh.transpose(1, 2), fresh.transpose(1, 2))
    with pytest.raises(RuntimeError, match="token_index must have one entry"):
        ops.kv_deviation(fresh, fresh, torch.arange(7, device=device))
    with pytest.raises(RuntimeError, match="token_index must be int32 or int64"):
        ops.kv_deviation(fresh, fresh, torch.arange(8, device=device).float())
    with pytest.raises(RuntimeError, match="out must be float32"):
        ops.kv_deviation(fresh, fresh, out=torch.empty(8, device=device, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"out must be \[8\]"):
        ops.kv_deviation(fresh, fresh, out=torch.empty(9, device=device))
    if device == "cpu":  # index values are checked on the host; CUDA asserts on device
        with pytest.raises(RuntimeError, match="token_index.*outside"):
            ops.kv_deviation(fresh, fresh, torch.tensor([0, 1, 2, 3, 4, 5, 6, 8]))
        with pytest.raises(RuntimeError, match="token_index.*outside"):
            ops.kv_deviation(fresh, fresh, torch.tensor([0, 1, 2, 3, 4, 5, 6, -1]))
    else:
        with pytest.raises(RuntimeError, match="token_index must be on the same device"):
            ops.kv_deviation(fresh, fresh, torch.arange(8))
        with pytest.raises(RuntimeError, match="reused must be on the same device"):
            ops.kv_deviation(fresh, fresh.cpu())


# ---------------------------------------------------------------------------
# select_hkvd (one request) and select_hkvd_batched (ragged batches)
# ---------------------------------------------------------------------------


def _num_candidates(n, forced, candidates):
    pool = torch.ones(n, dtype=torch.bool) if candidates is None else candidates.cpu().clone()
    if forced is not None:
        pool &= ~forced.cpu()
    return int(pool.sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens", SIZES)
@pytest.mark.parametrize("cand_frac", [None, 0.6])
def test_select_sizes(device, num_tokens, cand_frac):
    deviation = torch.rand(num_tokens, device=device) * 10
    forced, candidates = selection_masks(num_tokens, device, 0.05, cand_frac)
    num_cand = _num_candidates(num_tokens, forced, candidates)
    for k in sorted({0, 1, max(num_tokens // 7, 1), num_cand, num_cand + 5}):
        got = ops.select_hkvd(deviation, k, forced, candidates)
        want = reference.select_hkvd(deviation, k, forced, candidates)
        assert got.dtype == torch.int64 and got.device == deviation.device
        assert torch.equal(got.cpu(), want), f"k={k}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens", [7, 1000, 4096])
def test_select_ties_lower_index_wins(device, num_tokens):
    # Few distinct values (and -0.0 next to 0.0): most of the choice is tie-breaking.
    deviation = torch.randint(0, 4, (num_tokens,), device=device).float()
    deviation[::3] = -deviation[::3]
    deviation[deviation == 0] = torch.tensor(-0.0, device=device)
    deviation[::5] = 0.0
    forced, candidates = selection_masks(num_tokens, device, 0.1, 0.8)
    for k in [1, 2, num_tokens // 4, num_tokens // 2, num_tokens]:
        got = ops.select_hkvd(deviation, k, forced, candidates)
        assert torch.equal(got.cpu(), reference.select_hkvd(deviation, k, forced, candidates)), f"k={k}"
    # all equal: the k lowest positions
    flat = torch.full((num_tokens,), 1.5, device=device)
    assert torch.equal(ops.select_hkvd(flat, 3).cpu(), torch.arange(min(3, num_tokens)))


@pytest.mark.parametrize("device", DEVICES)
def test_select_signed_and_extreme_values(device):
    deviation = torch.randn(3001, device=device) * 1e3
    deviation[10] = float("inf")
    deviation[20] = float("-inf")
    deviation[30] = 3.4e38
    deviation[40] = -1e-40  # subnormal
    deviation[50] = 1e-40
    for k in [1, 2, 5, 100, 1500, 3000]:
        got = ops.select_hkvd(deviation, k)
        assert torch.equal(got.cpu(), reference.select_hkvd(deviation, k)), f"k={k}"


@pytest.mark.parametrize("device", DEVICES)
def test_select_nan_ranks_first(device):
    deviation = torch.rand(100, device=device)
    deviation[[7, 60]] = float("nan")
    assert torch.equal(ops.select_hkvd(deviation, 2).cpu(), torch.tensor([7, 60]))


@pytest.mark.parametrize("device", DEVICES)
def test_select_forced_more_than_k_and_k0(device):
    n = 500
    deviation = torch.rand(n, device=device)
    forced = torch.rand(n, device=device) < 0.3
    forced_idx = forced.nonzero().flatten().cpu()
    assert torch.equal(ops.select_hkvd(deviation, 0, forced).cpu(), forced_idx)
    got = ops.select_hkvd(deviation, 10, forced)
    assert got.numel() == forced_idx.numel() + 10
    assert torch.equal(got.cpu(), reference.select_hkvd(deviation, 10, forced))
    assert ops.select_hkvd(deviation, 0).numel() == 0
    # forced tokens that are not candidates are still selected
    none = torch.zeros(n, dtype=torch.bool, device=device)
    assert torch.equal(ops.select_hkvd(deviation, 10, forced, none).cpu(), forced_idx)
    # k >= candidates: everything
    assert torch.equal(ops.select_hkvd(deviation, 10 ** 12, forced).cpu(), torch.arange(n))


@pytest.mark.parametrize("device", DEVICES)
def test_select_empty_request(device):
    assert ops.select_hkvd(torch.empty(0, device=device), 5).numel() == 0


def _check_batched(device, lengths, ks, index_dtype, forced_frac=0.05, cand_frac=0.7, max_selected=None):
    total_extra = 3  # tokens past indptr[-1] are ignored
    total = sum(lengths) + total_extra
    deviation = torch.rand(total, device=device)
    forced, candidates = selection_masks(total, device, forced_frac, cand_frac)
    indptr = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=index_dtype, device=device)
    k = torch.tensor(ks, dtype=index_dtype, device=device)
    width = max(lengths) if max_selected is None else max_selected
    indices, counts = ops.select_hkvd_batched(deviation, indptr, k, forced, candidates, width)
    assert indices.shape == (len(lengths), width) and indices.dtype == torch.int64
    assert counts.shape == (len(lengths),) and counts.dtype == torch.int32
    indices, counts = indices.cpu(), counts.cpu()
    for b, (start, stop) in enumerate(zip(indptr[:-1].tolist(), indptr[1:].tolist())):
        want = reference.select_hkvd(deviation[start:stop], ks[b], forced[start:stop],
                                     None if candidates is None else candidates[start:stop])
        assert counts[b].item() == want.numel(), f"request {b}"
        kept = min(want.numel(), width)
        assert torch.equal(indices[b, :kept], want[:kept]), f"request {b}"
        assert (indices[b, kept:] == -1).all(), f"request {b} padding"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_select_batched_ragged(device, index_dtype):
    lengths = [0, 1, 7, 65, 1000, 0, 4096, 33]
    ks = [3, 0, 2, 10, 150, 0, 600, 100]
    _check_batched(device, lengths, ks, index_dtype)
    _check_batched(device, lengths, ks, index_dtype, cand_frac=None)


@pytest.mark.parametrize("device", DEVICES)
def test_select_batched_truncates_and_counts(device):
    # max_selected smaller than some selections: rows keep their lowest positions.
    _check_batched(device, [100, 50, 0, 300], [40, 5, 1, 200], torch.int64, forced_frac=0.2, max_selected=30)
    _check_batched(device, [10, 20], [3, 4], torch.int64, max_selected=0)


@pytest.mark.parametrize("device", DEVICES)
def test_select_batched_no_requests(device):
    indices, counts = ops.select_hkvd_batched(torch.rand(5, device=device), torch.zeros(1, dtype=torch.int64, device=device),
                                              torch.zeros(0, dtype=torch.int64, device=device), None, None, 4)
    assert indices.shape == (0, 4) and counts.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_select_gradual_filtering(device):
    # Second check layer: fresh KV only for the first selection; deviations of those rows
    # are scattered back and the next selection draws from them only.
    n, heads, dim = 600, 2, 32
    reused = torch.randn(n, heads, dim, device=device)
    fresh_all = reused + torch.randn_like(reused) * torch.rand(n, 1, 1, device=device)
    forced = torch.zeros(n, dtype=torch.bool, device=device)
    forced[-5:] = True
    first = ops.select_hkvd(ops.kv_deviation(fresh_all, reused), 200, forced)
    dev = torch.zeros(n, device=device)
    dev[first] = ops.kv_deviation(fresh_all[first], reused, first)
    candidates = torch.zeros(n, dtype=torch.bool, device=device)
    candidates[first] = True
    second = ops.select_hkvd(dev, 60, forced, candidates)
    assert torch.equal(second.cpu(), reference.select_hkvd(dev, 60, forced, candidates))
    assert set(second.tolist()) <= set(first.tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_select_opcheck(device):
    deviation = torch.rand(40, device=device)
    indptr = torch.tensor([0, 10, 10, 40], device=device)
    k = torch.tensor([3, 1, 50], device=device, dtype=torch.int32)
    forced = torch.rand(40, device=device) < 0.2
    torch.library.opcheck(torch.ops.cacheblend.select_hkvd_batched.default, (deviation, indptr, k, forced, None, 20))
    torch.library.opcheck(torch.ops.cacheblend.select_hkvd_batched.default,
                          (deviation, indptr, k, None, ~forced, 40))
    # data-dependent output size (the fake impl returns an unbacked size)
    torch.library.opcheck(torch.ops.cacheblend.select_hkvd.default, (deviation, 7, forced, None))
    torch.library.opcheck(torch.ops.cacheblend.select_hkvd.default, (deviation, 0, None, ~forced))


@pytest.mark.parametrize("device", DEVICES)
def test_select_errors(device):
    dev = torch.rand(10, device=device)
    indptr = torch.tensor([0, 4, 10], device=device)
    k = torch.tensor([1, 2], device=device)
    with pytest.raises(RuntimeError, match="k must be >= 0"):
        ops.select_hkvd(dev, -1)
    with pytest.raises(RuntimeError, match="deviation must be float32"):
        ops.select_hkvd(dev.half(), 1)
    with pytest.raises(RuntimeError, match="deviation must be 1-D"):
        ops.select_hkvd(dev.view(2, 5), 1)
    with pytest.raises(RuntimeError, match="forced must be a bool mask"):
        ops.select_hkvd(dev, 1, torch.zeros(10, device=device, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"candidates must be \[10\]"):
        ops.select_hkvd(dev, 1, None, torch.ones(9, device=device, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="k must have one entry per request"):
        ops.select_hkvd_batched(dev, indptr, torch.tensor([1], device=device))
    with pytest.raises(RuntimeError, match="k must be int32 or int64"):
        ops.select_hkvd_batched(dev, indptr, k.float())
    with pytest.raises(RuntimeError, match="indptr must be int32 or int64"):
        ops.select_hkvd_batched(dev, indptr.float(), k)
    with pytest.raises(RuntimeError, match="max_selected must be >= 0"):
        ops.select_hkvd_batched(dev, indptr, k, max_selected=-1)
    if device == "cpu":  # values are checked on the host; CUDA asserts on device
        with pytest.raises(RuntimeError, match="k must be >= 0"):
            ops.select_hkvd_batched(dev, indptr, torch.tensor([1, -2]))
        with pytest.raises(RuntimeError, match="indptr must be non-decreasing"):
            ops.select_hkvd_batched(dev, torch.tensor([0, 5, 4]), k)
        with pytest.raises(RuntimeError, match="exceeds the number of tokens"):
            ops.select_hkvd_batched(dev, torch.tensor([0, 5, 11]), k)
        with pytest.raises(RuntimeError, match=r"indptr\[0\] must be >= 0"):
            ops.select_hkvd_batched(dev, torch.tensor([-1, 5, 10]), k)
    else:
        with pytest.raises(RuntimeError, match="indptr must be on the same device"):
            ops.select_hkvd_batched(dev, indptr.cpu(), k)
        with pytest.raises(RuntimeError, match="forced must be on the same device"):
            ops.select_hkvd(dev, 1, torch.zeros(10, dtype=torch.bool))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or CUDA kernels not built)")
def test_select_cuda_graph_replay():
    # The batched path allocates nothing data-dependent and never syncs: it can be
    # captured once and replayed on new deviations and new k.
    n, heads, dim = 2048, 8, 128
    fresh = torch.randn(n, heads, dim, device="cuda", dtype=torch.bfloat16)
    reused = torch.randn_like(fresh)
    indptr = torch.tensor([0, 1000, n], device="cuda")
    k = torch.tensor([100, 300], device="cuda")
    forced = torch.rand(n, device="cuda") < 0.02
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        ops.select_hkvd_batched(ops.kv_deviation(fresh, reused), indptr, k, forced, None, 512)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        indices, counts = ops.select_hkvd_batched(ops.kv_deviation(fresh, reused), indptr, k, forced, None, 512)
    for _ in range(2):
        fresh.copy_(torch.randn_like(fresh))
        k.copy_(torch.randint(0, 400, (2,), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        dev = ops.kv_deviation(fresh, reused).cpu()  # deterministic: same values as inside the graph
        assert_deviation_close(dev, reference.kv_deviation(fresh.cpu(), reused.cpu()))
        for b, (s, e) in enumerate([(0, 1000), (1000, n)]):
            want = reference.select_hkvd(dev[s:e], int(k[b]), forced[s:e].cpu())
            assert counts[b].item() == want.numel()
            assert torch.equal(indices[b, : want.numel()].cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_select_torch_compile_fullgraph(device):
    # Fake impls let the ops trace without graph breaks (aot_eager keeps the test fast).
    def blend_select(fresh, reused, indptr, k, forced):
        return ops.select_hkvd_batched(ops.kv_deviation(fresh, reused), indptr, k, forced, None, 64)

    fresh, reused = torch.randn(2, 100, 2, 16, device=device).unbind(0)
    indptr = torch.tensor([0, 40, 100], device=device)
    k = torch.tensor([5, 20], device=device)
    forced = torch.rand(100, device=device) < 0.1
    compiled = torch.compile(blend_select, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(fresh, reused, indptr, k, forced), blend_select(fresh, reused, indptr, k, forced)):
        assert torch.equal(got, want)
    single = torch.compile(lambda d: ops.select_hkvd(d, 5), fullgraph=True, backend="aot_eager")
    dev = torch.rand(50, device=device)
    assert torch.equal(single(dev).cpu(), reference.select_hkvd(dev, 5))
