"""The blend's attention (steps 4 and 6): the computed rows' fresh K/V go into the
request's KV, then a causal prefill while every token is computed, and exact
position-causal sparse-query attention (``sparse_query_attention``) once only the selected
tokens are."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .step import host_to_device


def attend(decoder, states: list, l: int, qkv: list) -> list:
    """Steps 4 and 6: write each request's computed rows' fresh K/V into its KV, then
    attend: causal prefill on the full path, exact position-causal sparse-query attention
    on the selective path (one ragged call when every request of a batch is selective).
    Returns each request's attention output ``[rows, Hq, D]``."""
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
    sparse = [i for i, s in enumerate(states) if s.sel is not None]
    if len(sparse) > 1 and len(sparse) == len(states):  # one ragged call over the batch buffer
        kbig, vbig = states[0].batch_kv
        counts = torch.tensor([0] + [s.sel.numel() for s in states])
        q_indptr = host_to_device(counts.cumsum(0), decoder.device)
        kv_indptr = host_to_device(torch.tensor([s.batch_offset for s in states] + [kbig.shape[2]]), decoder.device)
        o = ops.sparse_query_attention(
            torch.cat([q for q, _, _ in qkv]), kbig[l].transpose(0, 1), vbig[l].transpose(0, 1),
            torch.cat([s.sel for s in states]), decoder.scaling, q_indptr=q_indptr, kv_indptr=kv_indptr)
        return list(o.split(counts[1:].tolist()))
    for i in sparse:
        k_tok, v_tok = states[i].layer_kv(l)
        outs[i] = ops.sparse_query_attention(qkv[i][0], k_tok, v_tok, states[i].sel, decoder.scaling)
    return outs
