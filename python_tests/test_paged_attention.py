"""sparse_query_attention_paged: K/V read in place from the engines' paged layouts
through a FlashInfer-style page table, against the contiguous op on the gathered K/V.

The engine's buffers are NaN everywhere except the pages the requests own (and, in the
last page, only the first kv_last_page_len slots): a read of any other element makes the
output NaN. Outputs start as NaN, so an unwritten element fails too.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cacheblend_ext import ops, reference
from conftest import DTYPES, HAS_CUDA, assert_close_to_ref, poison_
from test_engine_layouts import ENGINE_LAYOUTS, engine_kv_arg, engine_views, make_engine_cache

HKV, D = 2, 64


def _page_table(kv_lens, page_size, gen, spare_pages=3, index_dtype=torch.int64):
    """Pages for requests of ``kv_lens`` keys, scattered over a cache with a few spare
    pages: (num_pages, kv_indptr, kv_indices, kv_last_page_len)."""
    counts = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(counts) + spare_pages
    indices = torch.randperm(num_pages, generator=gen)[:sum(counts)]
    indptr = torch.tensor([0] + counts).cumsum(0)
    last = torch.tensor([(n - 1) % page_size + 1 if n else 0 for n in kv_lens])
    return num_pages, indptr.to(index_dtype), indices.to(index_dtype), last.to(index_dtype)


def _queries(q_counts, kv_lens, hq, dtype, gen):
    """Queries at random positions of their request (the last key among them), positions
    ascending within each request as the engine passes them."""
    pos = []
    for c, n in zip(q_counts, kv_lens):
        p = torch.randint(0, max(n, 1), (c,), generator=gen)
        if c:
            p[-1] = n - 1
        pos.append(p.sort().values)
    q = torch.randn(sum(q_counts), hq, D, generator=gen).to(dtype)
    return q, torch.cat(pos), torch.tensor([0] + list(q_counts)).cumsum(0)


def _fill_owned(cache, layer, kv_indptr, kv_indices, last, gen):
    """Random K/V in the slots the requests own; everything else stays NaN."""
    page_size = cache.page_size
    for t in engine_views(cache, layer):
        view = ops.paged_view(t, cache.layout)
        view = view.unsqueeze(1) if view.dim() == 3 else view
        for b in range(kv_indptr.shape[0] - 1):
            pages = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])].long()
            for i, page in enumerate(pages.tolist()):
                n = int(last[b]) if i == pages.numel() - 1 else page_size
                view[page, :n] = torch.randn(n, *view.shape[2:], generator=gen).to(view.dtype)


def _setup(kind, page_size, dtype, kv_lens, q_counts, hq, seed=0, index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    num_pages, kv_indptr, kv_indices, last = _page_table(kv_lens, page_size, gen, index_dtype=index_dtype)
    cache = make_engine_cache(kind, num_pages, page_size, HKV, D, dtype)
    _fill_owned(cache, 0, kv_indptr, kv_indices, last, gen)
    q, q_pos, q_indptr = _queries(q_counts, kv_lens, hq, dtype, gen)
    return cache, q, q_pos.to(index_dtype), q_indptr.to(index_dtype), kv_indptr, kv_indices, last


def _contiguous(cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last, attend):
    """The contiguous op (or its emulated kernel) on the gathered K/V."""
    k_view, v_view = (ops.paged_view(t, cache.layout) for t in engine_views(cache, 0))
    if k_view.dim() == 3:
        k_view, v_view = k_view.unsqueeze(1), v_view.unsqueeze(1)
    k, token_indptr = reference.gather_paged_kv(k_view, kv_indptr, kv_indices, last)
    v, _ = reference.gather_paged_kv(v_view, kv_indptr, kv_indices, last)
    assert not (k.isnan().any() or v.isnan().any())
    return attend(q, k, v, q_pos, q_indptr, token_indptr.to(q_indptr.dtype))


def _contiguous_cpu(q, k, v, q_pos, q_indptr, kv_indptr):
    return ops.sparse_query_attention(q, k, v, q_pos, q_indptr=q_indptr, kv_indptr=kv_indptr, return_lse=True)


_cuda_skip = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or CUDA kernels not built)")


def _to_device(args, device):
    """_setup's arguments (engine cache first) on ``device``."""
    cache, *tensors = args
    cache = dataclasses.replace(cache, buffers=[b.to(device) for b in cache.buffers])
    return (cache, *(t.to(device) for t in tensors))


def _paged_op(cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last):
    out = poison_(torch.empty_like(q))
    kv = engine_kv_arg(cache, 0)
    last_arg = None if cache.kind == "sglang" else last  # token pools: every page holds its one token
    got, lse = ops.sparse_query_attention_paged(q, kv, q_pos, q_indptr, kv_indptr, kv_indices, last_arg,
                                                layout=cache.layout, out=out, return_lse=True)
    assert got is out
    return got, lse


KV_LENS, Q_COUNTS = [1, 7, 65, 300, 0], [1, 3, 9, 12, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [16, 5, 1])
@pytest.mark.parametrize("kind", list(ENGINE_LAYOUTS))
def test_layouts_cpu(kind, page_size, dtype):
    """Every engine layout, ragged requests (one with no keys and no queries), a request
    of 300 keys (key tiles span pages): equal to the contiguous op on the gathered K/V."""
    if kind == "sglang" and page_size != 1:
        pytest.skip("SGLang pools are page size 1")
    args = _setup(kind, page_size, dtype, KV_LENS, Q_COUNTS, hq=6)
    out, lse = _paged_op(*args)
    want_out, want_lse = _contiguous(*args, _contiguous_cpu)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("hq", [2, 6, 16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_gqa_and_int32_against_reference(hq, index_dtype):
    """GQA ratios 1, 3 and 8, FlashInfer's int32 page tables, against the float64
    reference of the paged op."""
    cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last = _setup(
        "flashinfer_hnd_pair", 16, torch.bfloat16, [33, 129], [4, 7], hq, index_dtype=index_dtype)
    out, lse = _paged_op(cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last)
    k_view, v_view = (ops.paged_view(t, "HND") for t in engine_views(cache, 0))
    want_out, want_lse = reference.sparse_query_attention_paged(q, k_view, v_view, q_pos, q_indptr, kv_indptr,
                                                                kv_indices, last)
    assert_close_to_ref(out, want_out, torch.bfloat16, factor=2.0)
    assert_close_to_ref(lse, want_lse, torch.float32, scale=1.0, factor=50.0)


def _emulated_paged(emulated, impl="flash", tiles_per_split=0):
    def run(cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last):
        k, v = ops.kv_pair(engine_kv_arg(cache, 0), cache.layout)
        out, lse = poison_(torch.empty_like(q)), poison_(torch.empty(q.shape[:2]))
        emulated.sparse_query_attention_paged(q, k, v, q_pos, q_indptr, kv_indptr, kv_indices, last,
                                              q.shape[-1] ** -0.5, out, lse, impl, tiles_per_split)
        return out, lse
    return run


def _emulated_contiguous(emulated, impl="simt", tiles_per_split=0):
    def run(q, k, v, q_pos, q_indptr, kv_indptr):
        out, lse = poison_(torch.empty_like(q)), poison_(torch.empty(q.shape[:2]))
        emulated.sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr, q.shape[-1] ** -0.5, out, lse, impl,
                                        tiles_per_split)
        return out, lse
    return run


@pytest.mark.parametrize("impl", ["flash", "flash_s2", "flash_s3", "flash_m32", "simt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [16, 5, 1])
@pytest.mark.parametrize("kind", list(ENGINE_LAYOUTS))
def test_layouts_emulated(emulated_kernels, kind, page_size, dtype, impl):
    """The CUDA kernels in the host emulator (fp16 / bf16: the flash kernel in both shapes,
    or the SIMT kernel; fp32: the SIMT kernel): bit-equal to the same kernel on the gathered
    K/V (one key tile per split, so both plan the same splits), and close to the CPU op."""
    if kind == "sglang" and page_size != 1:
        pytest.skip("SGLang pools are page size 1")
    args = _setup(kind, page_size, dtype, [1, 7, 40, 0, 150], [1, 3, 4, 0, 9], hq=4)
    out, lse = _emulated_paged(emulated_kernels, impl, 1)(*args)
    # A cache whose rows are not 16-byte aligned takes the paged SIMT kernel.
    want_impl = "simt" if kind == "misaligned" else impl
    want_out, want_lse = _contiguous(*args, _emulated_contiguous(emulated_kernels, want_impl, 1))
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    cpu_out, _ = _paged_op(*args)
    assert_close_to_ref(out, cpu_out.double(), dtype, factor=2.0)


@_cuda_skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(ENGINE_LAYOUTS))
def test_layouts_cuda(kind, dtype):
    """The CUDA kernel on a GPU, every layout: close to the CPU op (the kernels sum in a
    different order)."""
    page_size = 1 if kind == "sglang" else 5
    args = _setup(kind, page_size, dtype, KV_LENS, Q_COUNTS, hq=6)
    cpu_out, cpu_lse = _paged_op(*args)
    out, lse = _paged_op(*_to_device(args, "cuda"))
    assert_close_to_ref(out, cpu_out.double(), dtype, factor=2.0)
    assert_close_to_ref(lse, cpu_lse.double(), torch.float32, scale=1.0, factor=50.0)


@_cuda_skip
def test_cuda_graph_replay():
    """No host sync and no data-dependent allocation: the op is captured once and replayed
    over new cache contents (written in place, as an engine does)."""
    args = _to_device(_setup("flashinfer_hnd_pair", 16, torch.bfloat16, [33, 129], [4, 7], hq=6), "cuda")
    cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last = args
    k, v = ops.kv_pair(engine_kv_arg(cache, 0), cache.layout)
    out = torch.empty_like(q)

    def run():
        torch.ops.cacheblend.sparse_query_attention_paged(q, k, v, q_pos, q_indptr, kv_indptr, kv_indices, last,
                                                          0.125, out, None)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(2):
        for buf in cache.buffers:  # new values where they were finite (the owned slots)
            buf.copy_(torch.where(buf.isnan(), buf, torch.randn_like(buf)))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.empty_like(q)
        torch.ops.cacheblend.sparse_query_attention_paged(q, k, v, q_pos, q_indptr, kv_indptr, kv_indices, last,
                                                          0.125, want, None)
        assert torch.equal(out, want)


def test_torch_compile_fullgraph():
    """The wrappers (layout views included) trace without graph breaks through the fake
    implementations."""
    cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last = _setup("vllm_all_layers_hnd", 5, torch.float32,
                                                                     [7, 12], [2, 3], hq=4)
    k, v = engine_views(cache, 0)

    def attend(q, k, v, q_pos, q_indptr, kv_indptr, kv_indices, last):
        return ops.sparse_query_attention_paged(q, (k, v), q_pos, q_indptr, kv_indptr, kv_indices, last,
                                                layout="HND", return_lse=True)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    inputs = (q, k, v, q_pos, q_indptr, kv_indptr, kv_indices, last)
    for got, want in zip(compiled(*inputs), attend(*inputs)):
        assert torch.equal(got, want)


def test_device_checks_emulated(emulated_kernels):
    """Bad page-table values trip the kernel's device-side checks, by name."""
    cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last = _setup("flashinfer_nhd_pair", 4, torch.float32,
                                                                     [5, 9], [2, 2], hq=2)
    run = _emulated_paged(emulated_kernels)
    bad_page = kv_indices.clone()
    bad_page[0] = cache.num_pages
    with pytest.raises(RuntimeError, match="kv_indices entry outside the cache's pages"):
        run(cache, q, q_pos, q_indptr, kv_indptr, bad_page, last)
    with pytest.raises(RuntimeError, match=r"kv_last_page_len outside \[1, page_size\]"):
        run(cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last + 4)
    with pytest.raises(RuntimeError, match="q_pos outside its request"):
        run(cache, q, q_pos + 9, q_indptr, kv_indptr, kv_indices, last)


def test_opcheck():
    cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last = _setup("vllm_all_layers_hnd", 5, torch.float32,
                                                                     [7, 12], [2, 3], hq=4)
    k, v = ops.kv_pair(engine_kv_arg(cache, 0), cache.layout)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)  # opcheck compares outputs of repeated runs
    torch.library.opcheck(torch.ops.cacheblend.sparse_query_attention_paged.default,
                          (q, k, v, q_pos, q_indptr, kv_indptr, kv_indices, last, 0.125, torch.empty_like(q),
                           torch.empty(q.shape[:2])))


def test_bad_inputs():
    cache, q, q_pos, q_indptr, kv_indptr, kv_indices, last = _setup("flashinfer_nhd_pair", 4, torch.float32,
                                                                     [5, 9], [2, 2], hq=2)
    k, v = engine_views(cache, 0)
    base = dict(q=q, kv=(k, v), q_pos=q_pos, q_indptr=q_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices,
                last=last, layout="NHD")
    cases = [
        (dict(kv_indices=kv_indices.clone().fill_(cache.num_pages)), r"kv_indices\[0\] = \d+ is outside \[0, num_pages"),
        (dict(last=torch.tensor([0, 1])), r"kv_last_page_len\[0\] = 0 is outside \[1, page_size = 4\]"),
        (dict(last=torch.tensor([2, 5])), r"kv_last_page_len\[1\] = 5 is outside"),
        (dict(last=last[:1]), "kv_last_page_len must have one entry per request"),
        (dict(kv_indptr=torch.tensor([0, 2, 9])), "kv_indptr must be non-decreasing within"),
        (dict(kv_indptr=kv_indptr[:2]), "kv_indptr must have the length of q_indptr"),
        (dict(q_pos=q_pos + 9), r"q_pos\[\d\] = \d+ is outside request"),
        (dict(q_indptr=torch.tensor([0, 1, 3])), "q_indptr must start at 0 and end at num_queries"),
        (dict(kv=(k, v[:, :, :1])), "v_cache must have the shape of k_cache"),
        (dict(kv=(k, v.half())), "v_cache must have the dtype of q"),
        (dict(kv=(k[..., :32], v[..., :32])), r"k_cache head_dim \(32\) must equal q head_dim"),
        (dict(q=q[:, :1].expand(-1, 3, -1)), r"num_q_heads \(3\) must be a positive multiple of num_kv_heads \(2\)"),
        (dict(kv_indices=kv_indices.float()), "kv_indices must be int32 or int64"),
        (dict(kv=torch.zeros(4, 3, 4, HKV, D)), r"kv_cache as one tensor must be \[num_pages, 2"),
        (dict(layout="hnd"), "layout must be 'NHD' or 'HND'"),
        (dict(kv=(k[:, 0], v[:, 0]), layout="HND"), "k_cache as a token pool"),
    ]
    for overrides, message in cases:
        a = dict(base, **overrides)
        with pytest.raises((RuntimeError, ValueError), match=message):
            ops.sparse_query_attention_paged(a["q"], a["kv"], a["q_pos"], a["q_indptr"], a["kv_indptr"],
                                             a["kv_indices"], a["last"], layout=a["layout"])
    with pytest.raises(RuntimeError, match=r"k_cache must be \[num_pages, page_size, num_kv_heads, head_dim\]"):
        torch.ops.cacheblend.sparse_query_attention_paged(q, k[0], v[0], q_pos, q_indptr, kv_indptr, kv_indices, last,
                                                          0.1, torch.empty_like(q), None)


def test_no_copy_of_the_cache():
    """The ops read and write an engine's buffers in place: with a 64 MiB cache per K
    and V (HND views of one [pages, 2, H, page_size, D] tensor), concatenating into it and
    attending over all of it raise the process's peak RSS (VmHWM, reset before) by far
    less than one copy of K, which a control copy shows the measurement would see."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    code = textwrap.dedent("""
        import torch
        from cacheblend_ext import ops
        from cacheblend_ext.rope import build_cos_sin_cache
        torch.set_num_threads(2)
        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        def reset_peak():  # VmHWM := VmRSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        pages, ps, H, D = 2048, 16, 8, 64
        kv = torch.randn(pages, 2, H, ps, D)  # FlashInfer HND single tensor, 128 MiB
        k_view, v_view = kv[:, 0], kv[:, 1]
        one_copy = k_view.numel() * 4
        table = build_cos_sin_cache(1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)), 8192)
        chunk = torch.randn(1, 2, 4096, H, D)
        pos = torch.arange(4096)
        q = torch.randn(4, 2 * H, D)
        n = pages * ps
        args = (torch.tensor([n - 4, n - 3, n - 2, n - 1]), torch.tensor([0, 4]), torch.tensor([0, pages]),
                torch.randperm(pages), torch.tensor([ps]))
        # warm up (thread pools, lazy initialisation) on a small cache
        ops.sparse_query_attention_paged(q[:1], kv[:4], torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([0, 1]),
                                         torch.tensor([0]), torch.tensor([1]), layout="HND")
        reset_peak()
        base = status("VmRSS")
        ops.fused_kv_concat([chunk], pos, pos + 7, torch.randperm(n)[:4096], table, True, [k_view], [v_view],
                            layout="HND")
        out = ops.sparse_query_attention_paged(q, kv, *args, layout="HND")
        assert not out.isnan().any()
        grew = status("VmHWM") - base
        reset_peak()
        base = status("VmRSS")
        copy = k_view.transpose(1, 2).contiguous()  # what a hidden copy of K would cost
        seen = status("VmHWM") - base
        print(grew / one_copy, seen / one_copy)
        assert seen > 0.9 * one_copy, f"the control copy raised the peak by only {seen / one_copy:.2f} copies"
        assert grew < 0.25 * one_copy, f"the ops raised the peak by {grew / one_copy:.2f} copies of K"
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)  # peak growth of the ops and of the control copy, in copies of K


def test_k_and_v_with_different_strides(emulated_kernels):
    """K in an NHD buffer, V in an HND one (and a wider row): each is read with its own
    page, offset and head strides, on the CPU and in the emulated CUDA kernel."""
    gen = torch.Generator().manual_seed(9)
    num_pages, kv_indptr, kv_indices, last = _page_table([9, 23], 4, gen)
    k = torch.randn(num_pages, 4, HKV, D, generator=gen)
    v = torch.randn(num_pages, HKV, 4, D + 8, generator=gen)[..., 8:].transpose(1, 2)
    q, q_pos, q_indptr = _queries([3, 5], [9, 23], 4, torch.float32, gen)
    want, want_lse = reference.sparse_query_attention_paged(q, k, v, q_pos, q_indptr, kv_indptr, kv_indices, last)
    out, lse = ops.sparse_query_attention_paged(q, (k, v), q_pos, q_indptr, kv_indptr, kv_indices, last,
                                                return_lse=True)
    assert_close_to_ref(out, want, torch.float32)
    out_emu, lse_emu = poison_(torch.empty_like(q)), poison_(torch.empty(q.shape[:2]))
    emulated_kernels.sparse_query_attention_paged(q, k, v, q_pos, q_indptr, kv_indptr, kv_indices, last, D ** -0.5,
                                                  out_emu, lse_emu)
    assert_close_to_ref(out_emu, want, torch.float32)
    assert_close_to_ref(lse_emu, want_lse, torch.float32, scale=1.0, factor=50.0)
