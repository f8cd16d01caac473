"""Typed Python wrappers and fake (meta) implementations of ``torch.ops.cacheblend.*``.

Conventions shared by every op:
- token-major layouts ``[num_tokens, num_heads, head_dim]``, last dim contiguous,
  other strides free;
- fp16 / bf16 / fp32 storage, fp32 math; positions and indices int32 or int64;
- in-place outputs are declared ``Tensor(a!)`` in the schema; CUDA kernels run on the
  current stream and never synchronise with the host.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from . import library  # noqa: F401  (registers torch.ops.cacheblend)

_ops = torch.ops.cacheblend


# ---------------------------------------------------------------------------
# Argument types: a one-line TypeError naming the argument, before the dispatcher's
# multi-line report of every overload.
# ---------------------------------------------------------------------------


def _type_name(value) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _not_a_tensor(op: str, name: str, value, expected: str = "a torch.Tensor") -> TypeError:
    hint = ""
    if type(value).__module__.split(".")[0] == "numpy":
        hint = " (torch.from_numpy(x) makes one from a numpy array)"
    elif isinstance(value, (list, tuple, int, float)):
        hint = " (torch.tensor(x) makes one)"
    return TypeError(f"{op}: {name} must be {expected}, got {_type_name(value)}{hint}")


def _check_tensor(op: str, name: str, value, optional: bool = False) -> None:
    if not (isinstance(value, torch.Tensor) or (optional and value is None)):
        raise _not_a_tensor(op, name, value, "a torch.Tensor or None" if optional else "a torch.Tensor")


def _check_tensor_list(op: str, name: str, values, what: str) -> None:
    """``values``: a tensor (``what`` says its shape) or a sequence of tensors."""
    if isinstance(values, torch.Tensor):
        return
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise _not_a_tensor(op, name, values, f"{what} or a list of torch.Tensor")
    for i, value in enumerate(values):
        if not isinstance(value, torch.Tensor):
            raise _not_a_tensor(op, f"{name}[{i}]", value)


def _check_int(op: str, name: str, value) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {_type_name(value)}") from None


def _check_scale(op: str, scale) -> None:
    if scale is None:
        return
    try:
        float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: scale must be a float or None, got {_type_name(scale)}") from None


# ---------------------------------------------------------------------------
# RoPE re-positioning
# ---------------------------------------------------------------------------


def rope_reposition(
    key: torch.Tensor,
    src_pos: torch.Tensor,
    dst_pos: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate each token of ``key`` ``[T, H, D]`` from ``src_pos[t]`` to ``dst_pos[t]``.

    ``key`` holds keys already rotated at ``src_pos`` (as a model caches them); the
    result equals the same raw keys rotated at ``dst_pos``. ``cos_sin_cache`` is
    ``[max_pos, rotary_dim]`` float32 (see :mod:`cacheblend_ext.rope`); dims past
    ``rotary_dim`` pass through. Works in place on ``key`` unless ``out`` is given.
    Returns the rotated tensor (``key`` or ``out``).
    """
    for name, value in (("key", key), ("src_pos", src_pos), ("dst_pos", dst_pos), ("cos_sin_cache", cos_sin_cache)):
        _check_tensor("rope_reposition", name, value)
    _check_tensor("rope_reposition", "out", out, optional=True)
    if out is None:
        _ops.rope_reposition(key, src_pos, dst_pos, cos_sin_cache, is_neox)
        return key
    _ops.rope_reposition_out(key, src_pos, dst_pos, cos_sin_cache, is_neox, out=out)
    return out


@torch.library.register_fake("cacheblend::rope_reposition")
def _rope_reposition_fake(key, src_pos, dst_pos, cos_sin_cache, is_neox) -> None:
    return None


@torch.library.register_fake("cacheblend::rope_reposition_out")
def _rope_reposition_out_fake(key, src_pos, dst_pos, cos_sin_cache, is_neox, *, out) -> None:
    return None


# ---------------------------------------------------------------------------
# Fused KV concatenation + RoPE re-positioning
# ---------------------------------------------------------------------------


KV_LAYOUTS = ("NHD", "HND")


def _check_layout(layout: str) -> None:
    if layout not in KV_LAYOUTS:
        raise ValueError(f"layout must be 'NHD' or 'HND', got {layout!r}")


def paged_view(cache: torch.Tensor, layout: str = "NHD", name: str = "cache") -> torch.Tensor:
    """The ops' view of one engine cache tensor: ``[num_blocks, block_size, H, D]`` (or a
    token pool ``[num_slots, H, D]``), a view of ``cache``, never a copy.

    ``layout="NHD"``: ``cache`` is already ``[num_blocks, block_size, H, D]`` (vLLM,
    FlashInfer NHD) or ``[num_slots, H, D]`` (SGLang's token pools, a contiguous request
    KV). ``layout="HND"``: ``cache`` is ``[num_blocks, H, block_size, D]`` (FlashInfer
    HND, vLLM's heads-first layout); the view swaps the two middle dims. Any strides are
    kept as they are (K and V side by side in one buffer's last dimension, one layer of an
    all-layers buffer), only the last dim must be contiguous; the ops read the block,
    offset and head strides from the view.
    """
    _check_tensor("paged_view", name, cache)
    _check_layout(layout)
    if layout == "NHD":
        return cache
    if cache.dim() != 4:
        raise ValueError(f"{name} with layout='HND' must be [num_blocks, H, block_size, D], "
                         f"got shape {tuple(cache.shape)}")
    return cache.transpose(1, 2)


def _per_layer(caches: torch.Tensor | Sequence[torch.Tensor], name: str, layout: str = "NHD") -> list[torch.Tensor]:
    if isinstance(caches, torch.Tensor):
        if caches.dim() not in (4, 5):
            raise ValueError(
                f"{name} as one tensor must be [L, num_slots, H, D] or [L, num_blocks, block_size, H, D] "
                f"([L, num_blocks, H, block_size, D] with layout='HND'), got shape {tuple(caches.shape)}"
            )
        caches = caches.unbind(0)
    return [paged_view(c, layout, f"{name}[{l}]") for l, c in enumerate(caches)]


def fused_kv_concat(
    chunks: Sequence[torch.Tensor],
    src_pos: torch.Tensor,
    dst_pos: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    k_caches: torch.Tensor | Sequence[torch.Tensor],
    v_caches: torch.Tensor | Sequence[torch.Tensor],
    *,
    layout: str = "NHD",
) -> None:
    """Gather the cached K/V of many chunks, for every layer, into a request's cache.

    How chunks are passed: ``chunks[i]`` is ``[L, 2, T_i, H, D]`` (K after RoPE at its
    cached positions, then V) with the last dim contiguous and other strides free, so
    slices or views of a store buffer are read in place, never copied first. Token ``t``
    of their concatenation (chunk 0's tokens, then chunk 1's, ...) is written to slot
    ``slot_mapping[t]`` of every layer (``-1`` skips it), with its K re-rotated from
    ``src_pos[t]`` to ``dst_pos[t]``. ``src_pos``, ``dst_pos`` and ``slot_mapping`` are
    ``[sum T_i]`` of one integer dtype.

    Destinations: ``k_caches`` / ``v_caches`` are either one tensor ``[L, num_slots, H, D]``
    (contiguous request KV, slot = row) or ``[L, num_blocks, block_size, H, D]`` (paged),
    or lists of L per-layer tensors ``[num_slots, H, D]`` / ``[num_blocks, block_size, H, D]``
    (as vLLM keeps them). Slot ``s`` of a paged cache is block ``s // block_size``, offset
    ``s % block_size`` (vLLM's ``slot_mapping``). ``layout="HND"``: the paged caches are
    ``[num_blocks, H, block_size, D]`` (heads before the block offset). Every per-layer
    cache may be a strided view of an engine's buffer (K and V of ``[num_blocks, 2, ...]``,
    K and V side by side in one last dimension, one layer of an all-layers buffer): the
    op writes into it in place, whatever its strides (see :func:`paged_view` and
    docs/layouts.md). Each destination element is written once, in one
    launch for up to 32 chunks x 64 layers; the CUDA kernel uses 16-byte vectors when every
    row and stride allows, scalar accesses otherwise. Slots must be unique (checked on the
    CPU; on CUDA it is the caller's contract, like vLLM's ``reshape_and_cache``).
    """
    op = "fused_kv_concat"
    _check_tensor_list(op, "chunks", chunks, "a torch.Tensor [C, L, 2, T, H, D]")
    for name, value in (("src_pos", src_pos), ("dst_pos", dst_pos), ("slot_mapping", slot_mapping),
                        ("cos_sin_cache", cos_sin_cache)):
        _check_tensor(op, name, value)
    _check_tensor_list(op, "k_caches", k_caches, "a torch.Tensor [L, ...]")
    _check_tensor_list(op, "v_caches", v_caches, "a torch.Tensor [L, ...]")
    _ops.fused_kv_concat(
        list(chunks),
        src_pos,
        dst_pos,
        slot_mapping,
        cos_sin_cache,
        is_neox,
        _per_layer(k_caches, "k_caches", layout),
        _per_layer(v_caches, "v_caches", layout),
    )


@torch.library.register_fake("cacheblend::fused_kv_concat")
def _fused_kv_concat_fake(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, is_neox, k_caches, v_caches) -> None:
    return None


# ---------------------------------------------------------------------------
# HKVD selection: KV deviation + top-k
# ---------------------------------------------------------------------------


def kv_deviation(
    fresh: torch.Tensor,
    reused: torch.Tensor,
    token_index: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Per-token deviation ``[M]`` float32 between fresh and reused K (or V).

    ``fresh`` is ``[M, H, D]``, ``reused`` ``[N, H, D]`` (same dtype: fp16, bf16 or
    fp32; last dim contiguous, other strides free). Row ``i`` of ``fresh`` is compared
    with ``reused[token_index[i]]`` (int32/int64), or with ``reused[i]`` when
    ``token_index`` is None (then ``M == N``). Result: ``sum over heads and dims of
    (fresh - reused)^2`` accumulated in fp32. With ``out`` (``[M]`` float32,
    contiguous) the result is written there, or added to it when ``accumulate=True``
    (K+V deviation = two calls). One pass over the inputs, no host sync.
    """
    _check_tensor("kv_deviation", "fresh", fresh)
    _check_tensor("kv_deviation", "reused", reused)
    _check_tensor("kv_deviation", "token_index", token_index, optional=True)
    _check_tensor("kv_deviation", "out", out, optional=True)
    if out is None:
        if accumulate:
            raise ValueError("kv_deviation: accumulate=True needs an out tensor to add into")
        return _ops.kv_deviation(fresh, reused, token_index)
    _ops.kv_deviation_out(fresh, reused, token_index, accumulate, out=out)
    return out


def select_hkvd_batched(
    deviation: torch.Tensor,
    indptr: torch.Tensor,
    k: torch.Tensor,
    forced: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    max_selected: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HKVD selection for a ragged batch of requests; CUDA-graph safe.

    Request ``b`` owns ``deviation[indptr[b]:indptr[b + 1]]`` (``deviation`` ``[total]``
    float32, ``indptr`` ``[B + 1]`` int32/int64, non-decreasing, ``indptr[-1] <= total``).
    ``k`` ``[B]`` int32/int64 (a tensor, so it may change between replays of a captured
    graph). ``forced`` / ``candidates`` are optional bool masks ``[total]`` (None: no
    forced token / every token a candidate).

    Request ``b`` selects every forced token plus the ``k[b]`` non-forced candidates with
    the largest deviation (ties: lower position first; ``k[b]`` at least the number of
    candidates selects them all; ``k[b] = 0`` selects only the forced tokens). NaN
    deviations rank above every number; ``-0.0`` ties with ``0.0``.

    Returns ``(indices, counts)``: ``indices`` ``[B, max_selected]`` int64 holds the
    selected *local* positions (0 = the request's first token) ascending, padded with
    -1; ``counts`` ``[B]`` int32 is the full selection size. If ``counts[b] >
    max_selected`` the row keeps the lowest ``max_selected`` positions (size
    ``max_selected`` as ``max over b of (forced_b + k[b])`` or the longest request to
    never truncate). Shapes depend only on the arguments: no host sync and no
    data-dependent allocation. ``max_selected`` defaults to ``deviation.shape[0]``.

    CUDA: one kernel launch, one block per request (radix select on the order-preserving
    bits of the deviation, then an ordered compaction); invalid ``indptr`` or negative
    ``k`` raise a device-side assert. CPU: requests in parallel, the same errors raised
    as ``RuntimeError``.
    """
    op = "select_hkvd_batched"
    for name, value in (("deviation", deviation), ("indptr", indptr), ("k", k)):
        _check_tensor(op, name, value)
    _check_tensor(op, "forced", forced, optional=True)
    _check_tensor(op, "candidates", candidates, optional=True)
    if max_selected is None:
        max_selected = deviation.shape[0]
    max_selected = _check_int(op, "max_selected", max_selected)
    return _ops.select_hkvd_batched(deviation, indptr, k, forced, candidates, max_selected)


def select_hkvd(
    deviation: torch.Tensor,
    k: int,
    forced: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selected token indices (int64 ``[S]``, ascending) of one request.

    ``deviation`` ``[N]`` float32; ``forced`` / ``candidates`` bool masks ``[N]`` (None:
    no forced token / every token a candidate). Selects every forced token plus the top
    ``k`` non-forced candidates by deviation (ties: lower index first; ``k`` beyond the
    candidates selects all of them; ``k = 0`` selects only the forced tokens).

    Built on the batched kernel; the selection size is data dependent, so this reads it
    back to the host (one device-to-host sync on CUDA) and is not CUDA-graph safe:
    engines that capture graphs call :func:`select_hkvd_batched` directly. Under
    ``torch.compile`` the result has an unbacked (data-dependent) size.
    """
    _check_tensor("select_hkvd", "deviation", deviation)
    _check_tensor("select_hkvd", "forced", forced, optional=True)
    _check_tensor("select_hkvd", "candidates", candidates, optional=True)
    return _ops.select_hkvd(deviation, _check_int("select_hkvd", "k", k), forced, candidates)


@torch.library.register_fake("cacheblend::kv_deviation")
def _kv_deviation_fake(fresh, reused, token_index=None):
    torch._check(fresh.dim() == 3, lambda: f"fresh must be [num_tokens, num_heads, head_dim], got {fresh.shape}")
    return fresh.new_empty((fresh.shape[0],), dtype=torch.float32)


@torch.library.register_fake("cacheblend::kv_deviation_out")
def _kv_deviation_out_fake(fresh, reused, token_index, accumulate, *, out) -> None:
    return None


@torch.library.register_fake("cacheblend::select_hkvd")
def _select_hkvd_fake(deviation, k, forced=None, candidates=None):
    torch._check(k >= 0, lambda: f"k must be >= 0, got {k}")
    size = torch.library.get_ctx().new_dynamic_size()
    return deviation.new_empty((size,), dtype=torch.int64)


@torch.library.register_fake("cacheblend::select_hkvd_batched")
def _select_hkvd_batched_fake(deviation, indptr, k, forced, candidates, max_selected):
    num_requests = indptr.shape[0] - 1
    indices = deviation.new_empty((num_requests, max_selected), dtype=torch.int64)
    counts = deviation.new_empty((num_requests,), dtype=torch.int32)
    return indices, counts


# ---------------------------------------------------------------------------
# Sparse-query attention
# ---------------------------------------------------------------------------


def sparse_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float | None = None,
    *,
    q_indptr: torch.Tensor | None = None,
    kv_indptr: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of selected queries with the exact position-causal mask.

    ``q`` ``[M, Hq, D]`` holds queries at absolute positions ``q_pos`` ``[M]`` (int32 or
    int64, positions within their request); ``k``, ``v`` ``[N, Hkv, D]`` hold the
    request's keys and values, key ``j`` at position ``j``; ``Hq`` is a multiple of
    ``Hkv`` (grouped-query attention). Key ``j`` is visible to query ``i`` iff
    ``j <= q_pos[i]``. ``scale`` defaults to ``1 / sqrt(D)``.

    Ragged batches: ``q_indptr`` and ``kv_indptr`` ``[B + 1]`` (both or neither) give each
    request's rows of ``q`` / ``q_pos`` and of ``k`` / ``v``; ``None`` means one request.
    A request may have no queries.

    Returns ``out`` ``[M, Hq, D]`` in ``q``'s dtype (written into ``out`` when given) and,
    with ``return_lse``, also the natural-log log-sum-exp of the scaled scores
    ``[M, Hq]`` float32. Matches :func:`cacheblend_ext.ops.reference.sparse_query_attention`.
    """
    op = "sparse_query_attention"
    for name, value in (("q", q), ("k", k), ("v", v), ("q_pos", q_pos)):
        _check_tensor(op, name, value)
    for name, value in (("q_indptr", q_indptr), ("kv_indptr", kv_indptr), ("out", out)):
        _check_tensor(op, name, value, optional=True)
    _check_scale(op, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    _ops.sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr, float(scale), out, lse)
    return (out, lse) if return_lse else out


@torch.library.register_fake("cacheblend::sparse_query_attention")
def _sparse_query_attention_fake(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse) -> None:
    return None


ATTENTION_KERNELS = ("flash", "flash_s2", "flash_s3", "flash_m32", "simt")


class attention_kernel:
    """Chooses the CUDA kernel of both attention ops for fp16 / bf16, for the whole
    process; as a context manager, only inside the ``with`` block.

    ``impl``: ``"flash"`` (the default: FlashAttention-2 style, 16 rows per warp, K and V
    single-buffered), ``"flash_s2"`` / ``"flash_s3"`` (2- and 3-stage K / V pipelines),
    ``"flash_m32"`` (32 rows per warp) or ``"simt"``; the variants (``flash_s2``, ``flash_s3``,
    ``flash_m32``) exist only in builds made with ``CACHEBLEND_ATTENTION_VARIANTS=1``. ``tiles_per_split`` > 0 fixes the flash
    kernel's key split (key tiles per split) instead of the plan made from the shapes and
    the SM count. fp32, head dims other than 64 / 128, unaligned tensors and GPUs before
    sm_80 always take the SIMT kernel. The initial choice comes from the environment
    variables ``CACHEBLEND_ATTENTION_IMPL`` and ``CACHEBLEND_ATTENTION_TILES_PER_SPLIT``,
    read once. No effect on the CPU kernels; needs a build with the CUDA kernels.

    >>> with ops.attention_kernel("simt"):
    ...     ops.sparse_query_attention(q, k, v, q_pos)
    """

    def __init__(self, impl: str = "flash", tiles_per_split: int = 0):
        if impl not in ATTENTION_KERNELS:
            raise ValueError(f"impl must be one of {', '.join(ATTENTION_KERNELS)}, got {impl!r}")
        if not isinstance(tiles_per_split, int) or tiles_per_split < 0:
            raise ValueError(f"tiles_per_split must be a non-negative int, got {tiles_per_split!r}")
        if not library.has_cuda_kernels():
            raise RuntimeError("attention_kernel: this build of cacheblend has no CUDA kernels")
        self._previous = current_attention_kernel()
        _ops.set_attention_kernel(impl, tiles_per_split)

    def __enter__(self) -> "attention_kernel":
        return self

    def __exit__(self, *exc) -> None:
        _ops.set_attention_kernel(*self._previous)


def current_attention_kernel() -> tuple[str, int]:
    """The CUDA attention kernel in use for fp16 / bf16 and its fixed key split (0:
    planned), see :class:`attention_kernel`."""
    if not library.has_cuda_kernels():
        raise RuntimeError("current_attention_kernel: this build of cacheblend has no CUDA kernels")
    impl, tiles = _ops.attention_kernel()
    return str(impl), int(tiles)


def _check_kv_cache(op: str, kv_cache) -> None:
    if isinstance(kv_cache, torch.Tensor):
        return
    expected = "a torch.Tensor or a (k_cache, v_cache) pair of torch.Tensor"
    if not isinstance(kv_cache, (tuple, list)) or len(kv_cache) != 2:
        raise _not_a_tensor(op, "kv_cache", kv_cache, expected)
    for name, value in zip(("kv_cache[0] (k_cache)", "kv_cache[1] (v_cache)"), kv_cache):
        _check_tensor(op, name, value)


def kv_pair(kv_cache, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) as :func:`sparse_query_attention_paged` sees an engine's cache: views
    ``[num_pages, page_size, Hkv, D]`` of ``kv_cache`` (one ``[num_pages, 2, ...]`` tensor,
    a ``(k_cache, v_cache)`` pair, or token pools ``[num_slots, Hkv, D]``) in ``layout``."""
    _check_kv_cache("kv_pair", kv_cache)
    _check_layout(layout)
    if isinstance(kv_cache, torch.Tensor):
        if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
            raise ValueError(
                "kv_cache as one tensor must be [num_pages, 2, page_size, Hkv, D] (layout='NHD') or "
                f"[num_pages, 2, Hkv, page_size, D] (layout='HND'), got shape {tuple(kv_cache.shape)}")
        k, v = kv_cache[:, 0], kv_cache[:, 1]
    else:
        k, v = kv_cache
    out = []
    for t, name in ((k, "k_cache"), (v, "v_cache")):
        if t.dim() == 3:  # a token pool [num_slots, Hkv, D]: pages of one token
            if layout != "NHD":
                raise ValueError(f"{name} as a token pool [num_slots, Hkv, D] takes layout='NHD', got {layout!r}")
            t = t.unsqueeze(1)
        else:
            t = paged_view(t, layout, name)
        out.append(t)
    return out[0], out[1]


def sparse_query_attention_paged(
    q: torch.Tensor,
    kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    q_pos: torch.Tensor,
    q_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    layout: str = "NHD",
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_query_attention` with K and V read in place from a paged cache.

    ``kv_cache`` is an engine's cache for one layer, never copied: a ``(k_cache,
    v_cache)`` pair of ``[num_pages, page_size, Hkv, D]`` (``layout="NHD"``) or
    ``[num_pages, Hkv, page_size, D]`` (``layout="HND"``), or one tensor with K and V at
    dim 1, ``[num_pages, 2, page_size, Hkv, D]`` / ``[num_pages, 2, Hkv, page_size, D]``
    (vLLM's per-layer ``[num_blocks, 2, block_size, H, D]``, FlashInfer's single tensor).
    K and V may be any strided views with a contiguous last dim (K and V side by side in
    one buffer's last dim, one layer of an all-layers buffer). A token pool
    ``[num_slots, Hkv, D]`` pair (SGLang) is a cache with pages of one token: pass the
    request's slot ids (its location tensor) as ``kv_indices``.

    The page table is FlashInfer's: request ``b`` owns queries ``q_indptr[b] :
    q_indptr[b + 1]`` of ``q`` / ``q_pos`` and pages ``kv_indices[kv_indptr[b] :
    kv_indptr[b + 1]]`` in order, its last page holding ``kv_last_page_len[b]`` keys (1 to
    page_size; None: every last page full). Key ``j`` of a request sits at position ``j``:
    page ``kv_indices[kv_indptr[b] + j // page_size]``, offset ``j % page_size`` (vLLM's
    ``block_table`` row of a request is its ``kv_indices``). Masks, GQA, ``scale``,
    ``out`` and ``return_lse`` as :func:`sparse_query_attention`, whose result on the
    gathered K/V this equals. All index tensors are int32 or int64.

    CUDA: the SIMT kernel (one warp per (query, head), fp32 online softmax) reads each
    key through the page table; no host sync. CPU: the contiguous op's tiled GEMM kernel,
    each K/V tile gathered through the page table into its per-thread fp32 buffer.
    """
    op = "sparse_query_attention_paged"
    _check_tensor(op, "q", q)
    _check_kv_cache(op, kv_cache)
    for name, value in (("q_pos", q_pos), ("q_indptr", q_indptr), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices)):
        _check_tensor(op, name, value)
    _check_tensor(op, "kv_last_page_len", kv_last_page_len, optional=True)
    _check_tensor(op, "out", out, optional=True)
    _check_scale(op, scale)
    k_cache, v_cache = kv_pair(kv_cache, layout)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if kv_last_page_len is None:
        kv_last_page_len = torch.full((q_indptr.shape[0] - 1,), k_cache.shape[1], dtype=kv_indptr.dtype,
                                      device=kv_indptr.device)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    _ops.sparse_query_attention_paged(q, k_cache, v_cache, q_pos, q_indptr, kv_indptr, kv_indices, kv_last_page_len,
                                      float(scale), out, lse)
    return (out, lse) if return_lse else out


@torch.library.register_fake("cacheblend::sparse_query_attention_paged")
def _sparse_query_attention_paged_fake(q, k_cache, v_cache, q_pos, q_indptr, kv_indptr, kv_indices, kv_last_page_len,
                                       scale, out, lse) -> None:
    torch._check(q.dim() == 3, lambda: f"q must be [num_queries, num_q_heads, head_dim], got {q.shape}")
    torch._check(k_cache.dim() == 4, lambda: f"k_cache must be [num_pages, page_size, Hkv, D], got {k_cache.shape}")
    torch._check(out.shape == q.shape, lambda: f"out must have the shape of q {q.shape}, got {out.shape}")
    return None
