"""Plain-PyTorch reference implementations of every op, in float64 by default.

They define the ops' semantics: tests compare the kernels against them, and they are
written for clarity, not speed.
"""

from __future__ import annotations

import torch


def rope_rotate(x: torch.Tensor, pos: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Apply RoPE at ``pos`` to raw ``x`` ``[T, H, D]`` (float64 result)."""
    x = x.to(torch.float64)
    table = cos_sin_cache.to(torch.float64)[pos.long()]  # [T, rotary_dim]
    rotary_dim = table.shape[1]
    half = rotary_dim // 2
    cos, sin = table[:, None, :half], table[:, None, half:]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        a, b = rot[..., :half], rot[..., half:]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


def rope_reposition(
    key: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool
) -> torch.Tensor:
    """Re-rotate keys cached at ``src_pos`` to ``dst_pos`` (float64 result).

    Rotation by ``dst - src`` is composed from table rows: R(dst) R(src)^-1, with the
    scheme's attention factor cancelled by normalising with the src row's norm.
    """
    table = cos_sin_cache.to(torch.float64)
    half = table.shape[1] // 2
    s, d = table[src_pos.long()], table[dst_pos.long()]
    cs, ss, cd, sd = s[:, :half], s[:, half:], d[:, :half], d[:, half:]
    norm = cs * cs + ss * ss
    delta = torch.cat([(cd * cs + sd * ss) / norm, (sd * cs - cd * ss) / norm], dim=-1)
    zero = torch.zeros(key.shape[0], dtype=torch.long, device=key.device)
    # Rotating by the delta table at "position" t picks row t of `delta`.
    return rope_rotate(key, torch.arange(key.shape[0], device=key.device) + zero, delta, is_neox)


def fused_kv_concat(
    chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, is_neox, k_caches, v_caches
) -> None:
    """Reference of ``ops.fused_kv_concat``: writes into ``k_caches`` / ``v_caches``.

    ``chunks[i]`` is ``[L, 2, T_i, H, D]`` (K then V); token ``t`` of the concatenation
    goes to ``slot_mapping[t]`` of every layer (-1: skipped), its K re-rotated from
    ``src_pos[t]`` to ``dst_pos[t]``. Each cache is ``[num_slots, H, D]`` or
    ``[num_blocks, block_size, H, D]`` (flattened to slots).
    """
    cat = torch.cat([c for c in chunks], dim=2) if len(chunks) else None
    if cat is None or cat.shape[2] == 0:
        return
    keep = slot_mapping.long() >= 0
    slots = slot_mapping.long()[keep]
    for layer in range(cat.shape[0]):
        k = rope_reposition(cat[layer, 0], src_pos, dst_pos, cos_sin_cache, is_neox)
        k_dst = k_caches[layer].view(-1, *k_caches[layer].shape[-2:])
        v_dst = v_caches[layer].view(-1, *v_caches[layer].shape[-2:])
        k_dst[slots] = k[keep].to(k_dst.dtype)
        v_dst[slots] = cat[layer, 1][keep].to(v_dst.dtype)


def kv_deviation(fresh: torch.Tensor, reused: torch.Tensor, token_index: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token ``sum over heads and dims of (fresh - reused)^2`` (float64, ``[M]``).

    ``fresh`` is ``[M, H, D]``; row ``i`` is compared with ``reused[token_index[i]]``
    (``reused[i]`` when ``token_index`` is None).
    """
    ref = reused if token_index is None else reused[token_index.long()]
    diff = fresh.to(torch.float64) - ref.to(torch.float64)
    return diff.square().sum(dim=(1, 2))


def select_hkvd(
    deviation: torch.Tensor,
    k: int,
    forced: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selected token indices (int64, ascending): every forced token plus the ``k``
    non-forced candidates with the largest deviation (ties: lower index first).

    ``forced`` / ``candidates`` are bool masks ``[N]``; no candidates mask means all.
    """
    n = deviation.shape[0]
    forced = torch.zeros(n, dtype=torch.bool) if forced is None else forced.cpu().bool()
    candidates = torch.ones(n, dtype=torch.bool) if candidates is None else candidates.cpu().bool()
    dev = deviation.detach().cpu().to(torch.float64)
    pool = [i for i in range(n) if candidates[i] and not forced[i]]
    pool.sort(key=lambda i: (-dev[i].item(), i))
    chosen = set(pool[: max(k, 0)]) | {i for i in range(n) if forced[i]}
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def sparse_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float | None = None,
    q_indptr: torch.Tensor | None = None,
    kv_indptr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact position-causal attention of selected queries (float64 ``out [M, Hq, D]``,
    ``lse [M, Hq]``, natural log). Query ``i`` of request ``b`` sees the keys ``j`` of
    that request with ``j <= q_pos[i]``; with no indptrs there is one request.
    """
    m, hq, d = q.shape
    hkv = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    if q_indptr is None:
        q_indptr = torch.tensor([0, m])
        kv_indptr = torch.tensor([0, k.shape[0]])
    out = torch.zeros(m, hq, d, dtype=torch.float64)
    lse = torch.full((m, hq), float("-inf"), dtype=torch.float64)
    for b in range(len(q_indptr) - 1):
        q0, q1 = int(q_indptr[b]), int(q_indptr[b + 1])
        k0, k1 = int(kv_indptr[b]), int(kv_indptr[b + 1])
        if q1 == q0:
            continue
        qb = q[q0:q1].to("cpu", torch.float64)
        kb = k[k0:k1].to("cpu", torch.float64).repeat_interleave(hq // hkv, dim=1)
        vb = v[k0:k1].to("cpu", torch.float64).repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("mhd,nhd->hmn", qb, kb) * scale
        visible = torch.arange(k1 - k0)[None, :] <= q_pos[q0:q1].cpu().long()[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        lse_b = torch.logsumexp(scores, dim=-1)  # [H, M]
        probs = torch.exp(scores - lse_b[..., None])
        out[q0:q1] = torch.einsum("hmn,nhd->mhd", probs, vb)
        lse[q0:q1] = lse_b.transpose(0, 1)
    return out, lse


def gather_paged_kv(cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                    kv_last_page_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys (or values) of every request of a paged cache ``[num_pages, page_size, H, D]``
    as contiguous rows ``[N, H, D]`` (a copy, request after request) and their offsets
    ``[B + 1]`` (int64): request ``b``'s pages ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``,
    the last holding ``kv_last_page_len[b]`` rows."""
    page_size = cache.shape[1]
    rows, offsets = [], [0]
    for b in range(kv_indptr.shape[0] - 1):
        pages = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])].long()
        n = 0 if pages.numel() == 0 else (pages.numel() - 1) * page_size + int(kv_last_page_len[b])
        rows.append(cache[pages].reshape(-1, *cache.shape[2:])[:n])
        offsets.append(offsets[-1] + n)
    return torch.cat(rows), torch.tensor(offsets, dtype=torch.int64)


def sparse_query_attention_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    q_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``ops.sparse_query_attention_paged`` (caches ``[num_pages, page_size,
    Hkv, D]``): :func:`sparse_query_attention` on the gathered keys and values."""
    k, token_indptr = gather_paged_kv(k_cache, kv_indptr, kv_indices, kv_last_page_len)
    v, _ = gather_paged_kv(v_cache, kv_indptr, kv_indices, kv_last_page_len)
    return sparse_query_attention(q, k, v, q_pos, scale, q_indptr, token_indptr)
