"""The blend's attention at the layers up to the last check layer (steps 4 and 5): the
computed rows' fresh K/V go into the request's KV, then a causal prefill while every
token is computed, and exact position-causal sparse-query attention
(``sparse_query_attention``) once only the selected tokens are. The layers after the last
check layer run :mod:`cacheblend_ext.blend.step` instead."""

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
        state.selected.append(state.sel)
    if len(states) > 1 and all(s.sel is not None for s in states):  # one ragged call over the batch's KV
        kbig, vbig = states[0].batch_kv
        q_indptr, kv_indptr = states[0].batch_indptr
        o = ops.sparse_query_attention(
            torch.cat([q for q, _, _ in qkv]), kbig[l].transpose(0, 1), vbig[l].transpose(0, 1),
            torch.cat([s.sel for s in states]), decoder.scaling, q_indptr=q_indptr[l], kv_indptr=kv_indptr)
        return list(o.split([s.sel.numel() for s in states]))
    for i, state in enumerate(states):
        if state.sel is not None:
            k_tok, v_tok = state.layer_kv(l)
            outs[i] = ops.sparse_query_attention(qkv[i][0], k_tok, v_tok, state.sel, decoder.scaling)
    return outs
