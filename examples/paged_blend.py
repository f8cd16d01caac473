"""CacheBlend as a serving engine's attention backend would run it: KV in a vLLM-style
paged cache, every KV write and every attention a ``torch.ops.cacheblend`` op.

The request's KV lives in per-layer caches ``[num_blocks, 2, block_size, H_kv, D]``
(vLLM's layout) at scattered blocks given by a block table. The blend step:

1. ``fused_kv_concat``: every reused chunk's KV, all layers, into its slots (K re-rotated);
2. per layer, for the rows computed at that layer (all tokens at full layers, the
   selected ones after the check layer): Q/K/V projections with the model's own (Hugging
   Face) modules, ``rope_reposition`` of Q, ``fused_kv_concat`` of the fresh K/V into
   their slots (RoPE applied to K on the way: a rotation from position 0),
   ``sparse_query_attention_paged`` over the paged cache, output projection and MLP;
3. greedy decoding: one row per step through the same loop, its KV in the next slot.

Checks: at recompute ratio 1 the logits equal Hugging Face's full prefill; at 15% they
equal ``BlendEngine.blend`` at the same selection, and the decoded tokens equal
``BlendEngine.generate``. Run: ``python examples/paged_blend.py``.
"""

from __future__ import annotations

import torch

import cacheblend_ext  # noqa: F401  (registers torch.ops.cacheblend)
from cacheblend_ext import BlendConfig, BlendEngine, load_model

ops = torch.ops.cacheblend
BLOCK_SIZE = 16

PASSAGES = [
    "Project Falcon is led by Maria Okafor, who joined the company in 2015 as a data engineer.",
    "Maria Okafor was born in Lagos and studied computer science at the University of Toronto.",
]
QUESTION = "Question: Where was the leader of Project Falcon born? Answer: The leader of Project Falcon was born in"


class PagedKV:
    """Per-layer vLLM caches, a block table and the slot of every position."""

    def __init__(self, num_layers, num_kv_heads, head_dim, num_blocks, dtype, seed=0):
        self.caches = [torch.full((num_blocks, 2, BLOCK_SIZE, num_kv_heads, head_dim), float("nan"), dtype=dtype)
                       for _ in range(num_layers)]
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.block_table: list[int] = []
        self.length = 0

    def k(self, l):
        return self.caches[l][:, 0]  # [num_blocks, block_size, H_kv, D], a strided view

    def v(self, l):
        return self.caches[l][:, 1]

    def grow(self, n):
        """Room for n more positions; returns their slots (vLLM's slot_mapping)."""
        pos = torch.arange(self.length, self.length + n)
        while len(self.block_table) * BLOCK_SIZE < self.length + n:
            self.block_table.append(self.free.pop())
        self.length += n
        return self.slots(pos)

    def slots(self, pos):
        return torch.tensor(self.block_table)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE

    def page_table(self):
        """FlashInfer's kv_indptr, kv_indices and kv_last_page_len of this one request."""
        return (torch.tensor([0, len(self.block_table)]), torch.tensor(self.block_table),
                torch.tensor([(self.length - 1) % BLOCK_SIZE + 1]))


def run_layers(engine, rope, kv, hidden, rows, selected):
    """Every layer for the rows ``rows`` (positions; hidden holds their states), the rows
    narrowing to ``selected[l]`` where that is not None. Returns the last row's logits."""
    zeros = torch.zeros(rows.numel(), dtype=torch.int64)  # "from position 0": RoPE applied, not moved
    kv_indptr, kv_indices, last = kv.page_table()
    for l, layer in enumerate(engine.layers):
        if selected[l] is not None and selected[l].numel() != rows.numel():  # the check layer's selection
            keep = torch.searchsorted(rows, selected[l])
            rows, hidden, zeros = selected[l], hidden[keep], zeros[keep]
        attn, m = layer.self_attn, rows.numel()
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(m, -1, engine.head_dim)
        fresh = torch.stack([attn.k_proj(x), attn.v_proj(x)]).view(1, 2, m, -1, engine.head_dim)
        ops.rope_reposition(q, zeros, rows, rope.cos_sin_cache, rope.is_neox)
        ops.fused_kv_concat([fresh], zeros, rows, kv.slots(rows), rope.cos_sin_cache, rope.is_neox, [kv.k(l)],
                            [kv.v(l)])
        o = torch.empty_like(q)
        ops.sparse_query_attention_paged(q, kv.k(l), kv.v(l), rows, torch.tensor([0, m]), kv_indptr, kv_indices,
                                         last, engine.scaling, o, None)
        h = hidden + attn.o_proj(o.reshape(m, -1))
        hidden = h + layer.mlp(layer.post_attention_layernorm(h))
    return engine.model.lm_head(engine.base.norm(hidden[-1:]))[0].float()


@torch.inference_mode()
def paged_blend(engine, segments, selected, max_new_tokens=0):
    """Blend ``segments`` with the per-layer selections ``selected`` (None: all rows) in
    a paged cache; returns the first-token logits and the greedily decoded tokens."""
    plan = engine.plan_request(segments, BlendConfig.published())
    n = plan.num_tokens
    rope = engine.rope(n + max_new_tokens + int(plan.src_pos.max()) + 1)
    kv = PagedKV(engine.num_layers, engine.num_kv_heads, engine.head_dim, -(-(n + max_new_tokens) // BLOCK_SIZE) + 4,
                 engine.dtype)
    slots = kv.grow(n)
    dst = torch.cat([torch.arange(a, b) for a, b in plan.spans])
    ops.fused_kv_concat([c.kv for c in plan.chunks], plan.src_pos, dst, slots[dst], rope.cos_sin_cache, rope.is_neox,
                        [kv.k(l) for l in range(engine.num_layers)], [kv.v(l) for l in range(engine.num_layers)])
    hidden = engine.base.embed_tokens(plan.input_ids)
    first = logits = run_layers(engine, rope, kv, hidden, torch.arange(n), selected)
    tokens = []
    for i in range(max_new_tokens):  # greedy, as BlendEngine.generate
        tokens.append(int(logits.argmax()))
        if i == max_new_tokens - 1:
            break
        pos = torch.tensor([kv.length])
        kv.grow(1)
        logits = run_layers(engine, rope, kv, engine.base.embed_tokens(torch.tensor(tokens[-1:])), pos,
                            [None] * engine.num_layers)
    return first, tokens, kv


def main(max_new_tokens=8):
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m-instruct")
    engine = BlendEngine(model, tokenizer)
    chunks = [engine.encode_chunk(p) for p in PASSAGES]
    segments = ["You answer questions about the records below.\n", *chunks, "\n" + QUESTION]
    layers = engine.num_layers

    full = engine.full_prefill(segments)
    logits, _, _ = paged_blend(engine, segments, [None] * layers)
    diff_full = (logits - full.logits).abs().max().item()
    print(f"ratio 1.0: paged blend vs Hugging Face full prefill, max |logit diff| = {diff_full:.2e}")

    blended = engine.blend(segments, BlendConfig.published(0.15))
    logits, tokens, kv = paged_blend(engine, segments, blended.selected, max_new_tokens)
    diff_blend = (logits - blended.logits).abs().max().item()
    n_sel = blended.selected[-1].numel()
    print(f"ratio 0.15 ({n_sel} of {blended.num_tokens} tokens from layer 1 on): paged blend vs "
          f"BlendEngine.blend, max |logit diff| = {diff_blend:.2e}")
    want = engine.generate(blended, max_new_tokens, stop_at_eos=False)
    print(f"decoded from the paged cache ({len(kv.block_table)} blocks of {BLOCK_SIZE}):",
          repr(tokenizer.decode(tokens)), "| same tokens as BlendEngine.generate:", tokens == want)
    scale = full.logits.abs().max().item()
    assert diff_full <= 1e-4 * scale and diff_blend <= 1e-4 * scale, "paged blend differs from the reference"
    assert tokens == want, (tokens, want)
    return diff_full, diff_blend


if __name__ == "__main__":
    main()
