"""The blend's attention at the layers up to the last check layer (steps 4 and 5): the
computed rows' fresh K/V go into the request's KV, then a causal prefill while every
token is computed, and exact position-causal sparse-query attention
(``sparse_query_attention``) once only the selected tokens are. The layers after the last
check layer run :mod:`cacheblend_ext.blend.step` instead, unless an option changes the
attention (:func:`changes_attention`): ``reused_logit_scale`` scales the stale reused keys
(:func:`scale_stale_keys`), and ``recompute_context="restricted"`` hides the other
chunks' stale keys from recomputed chunk tokens (:func:`restricted_attention`, in
PyTorch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops


def attend(decoder, states: list, l: int, qkv: list) -> list:
    """Write each request's computed rows' fresh K/V into its KV, then attend: causal
    prefill on the full path, exact position-causal sparse-query attention on the
    selective path (one ragged call when every request of a batch is selective, with the
    index pointers made when the batch started). Returns each request's attention output
    ``[rows, Hq, D]``."""
    outs = [None] * len(states)
    for i, (state, (q, k, v)) in enumerate(zip(states, qkv)):
        k_tok, v_tok = state.layer_kv(l)
        if state.sel is None:
            k_tok.copy_(k)
            v_tok.copy_(v)
            outs[i] = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], state.kbuf[l][None], state.vbuf[l][None], is_causal=True,
                scale=decoder.scaling, enable_gqa=decoder.num_heads != decoder.num_kv_heads)[0].transpose(0, 1)
        else:
            k_tok[state.sel] = k
            v_tok[state.sel] = v
            if state.plan.config.reused_logit_scale != 1.0 and l > 0 and state.plan.chunks:
                scale_stale_keys(state, l)
        state.selected.append(state.sel)
    sparse = [i for i, s in enumerate(states) if s.sel is not None]
    restricted = [i for i in sparse if states[i].plan.config.recompute_context == "restricted"]
    for i in restricted:
        outs[i] = restricted_attention(decoder, states[i], l, qkv[i][0])
    sparse = [i for i in sparse if i not in restricted]
    if len(sparse) > 1 and len(sparse) == len(states):  # one ragged call over the batch's KV
        kbig, vbig = states[0].batch_kv
        q_indptr, kv_indptr = states[0].batch_indptr
        o = ops.sparse_query_attention(
            torch.cat([q for q, _, _ in qkv]), kbig[l].transpose(0, 1), vbig[l].transpose(0, 1),
            torch.cat([s.sel for s in states]), decoder.scaling, q_indptr=q_indptr[l], kv_indptr=kv_indptr)
        return list(o.split([s.sel.numel() for s in states]))
    for i in sparse:
        k_tok, v_tok = states[i].layer_kv(l)
        outs[i] = ops.sparse_query_attention(qkv[i][0], k_tok, v_tok, states[i].sel, decoder.scaling)
    return outs


def changes_attention(config) -> bool:
    """Whether ``config`` changes the attention of the selective layers (APE-style key
    scaling or a restricted recompute context), which then run through :func:`attend`."""
    return config.reused_logit_scale != 1.0 or config.recompute_context == "restricted"


def stale_mask(state) -> torch.Tensor:
    """``[N]`` bool: positions whose KV at the current layer is reused, not recomputed."""
    stale = ~state.forced
    stale[state.sel] = False
    return stale


def scale_stale_keys(state, l: int) -> None:
    """``reused_logit_scale``: multiply the K rows of the stale reused tokens of layer ``l``
    by the scale, so every query's logit against them is scaled (a per-key logit scale,
    kept in the blended cache for decoding)."""
    k_tok = state.layer_kv(l)[0]
    stale = stale_mask(state).nonzero().flatten()
    k_tok[stale] = k_tok[stale] * state.plan.config.reused_logit_scale


def restricted_attention(decoder, state, l: int, q: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``recompute_context="restricted"``: attention of the selected rows ``q`` ``[M, Hq, D]``
    with the exact position-causal mask, where a row inside a reused chunk does not see the
    other chunks' stale keys (its own chunk, forced tokens and recomputed tokens it does);
    rows outside chunks see every key. Dense PyTorch in float32, ``block`` rows at a time."""
    k_tok, v_tok = state.layer_kv(l)
    chunk = state.chunk_index()
    rows = state.sel
    fresh = ~stale_mask(state)
    group = decoder.num_heads // decoder.num_kv_heads
    keys, values = k_tok.float(), v_tok.float()
    out = torch.empty_like(q)
    for a in range(0, rows.numel(), block):
        r = rows[a:a + block]
        rc = chunk[r]
        visible = (state.positions[None, :] <= r[:, None]) & (
            fresh[None, :] | (chunk[None, :] == rc[:, None]) | (rc[:, None] < 0))
        qg = q[a:a + block].float().view(r.numel(), decoder.num_kv_heads, group, decoder.head_dim)
        scores = torch.einsum("mhgd,nhd->mhgn", qg, keys) * decoder.scaling
        probs = scores.masked_fill(~visible[:, None, None, :], float("-inf")).softmax(-1)
        out[a:a + block] = torch.einsum("mhgn,nhd->mhgd", probs, values).reshape(r.numel(), -1,
                                                                                  decoder.head_dim).to(q.dtype)
    return out
