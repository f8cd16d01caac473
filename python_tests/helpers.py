"""Helpers the tests share: devices, dtypes and tolerances, inputs and float64 oracles of
the ops, the serving engines' KV layouts, and tiny Hugging Face models. Fixtures live in
conftest.py; the tests import these with ``from helpers import ...``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import torch

import cacheblend_ext
from cacheblend_ext import reference
from cacheblend_ext.blend.hf import make_dynamic_cache
from cacheblend_ext.rope import build_cos_sin_cache

if TYPE_CHECKING:
    from cacheblend_ext.blend.engine import BlendEngine
    from cacheblend_ext.chunk import ChunkKV

HAS_CUDA = torch.cuda.is_available() and cacheblend_ext.has_cuda_kernels()

# CPU always; CUDA cases are generated too and skipped only when no GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or CUDA kernels not built)")),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Max abs error vs a float64 reference, relative to the reference's scale: one
# rounding of the result to the storage dtype dominates.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output with NaN so any element a kernel fails to write is caught."""
    return t.fill_(float("nan"))


def assert_close_to_ref(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float | None = None,
                        factor: float = 1.0) -> None:
    """``max|actual - ref| <= rtol(dtype) * factor * scale`` with ``scale`` = max|ref| by default; NaN fails."""
    actual64 = actual.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    assert actual64.shape == ref64.shape, (actual64.shape, ref64.shape)
    assert not torch.isnan(actual64).any(), "output has NaN (unwritten or invalid elements)"
    if scale is None:
        scale = max(ref64.abs().max().item(), 1e-30) if ref64.numel() else 1.0
    err = (actual64 - ref64).abs().max().item() if ref64.numel() else 0.0
    tol = RTOL[dtype] * factor * scale
    assert err <= tol, f"max abs error {err:.3e} > tolerance {tol:.3e} ({dtype})"


def request_parts(seed=0, sizes=(19, 26, 13), vocab=160):
    """A random RAG request for the tiny test models: prefix ids, chunk ids, query ids."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.tensor([1, 7, 9])
    chunks = [torch.randint(3, vocab, (n,), generator=g) for n in sizes]
    query = torch.randint(3, vocab, (8,), generator=g)
    return prefix, chunks, query


# --------------------------------------------------- RoPE tables, fused KV concatenation

# The chunks of concat_request: layers and KV heads.
CONCAT_LAYERS, CONCAT_HEADS = 3, 2


def rope_table(rotary_dim: int, max_pos: int = 8192, factor: float = 1.0) -> torch.Tensor:
    """A NeoX RoPE cos/sin table ``[max_pos, rotary_dim]`` (base 10000, optional scaling factor)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    return build_cos_sin_cache(inv_freq, max_pos, factor)


def concat_request(lengths, head_dim, dtype, device, gen, index_dtype=torch.int64, layers=CONCAT_LAYERS,
                   heads=CONCAT_HEADS):
    """Chunks computed at positions 0..T_i-1 (as encoded alone) placed back to back at a
    random offset."""
    chunks = [torch.randn(layers, 2, t, heads, head_dim, generator=gen).to(device, dtype) for t in lengths]
    src = torch.cat([torch.arange(t) for t in lengths])
    offset = int(torch.randint(0, 1000, (1,), generator=gen))
    dst = torch.arange(sum(lengths)) + offset
    return chunks, src.to(device, index_dtype), dst.to(device, index_dtype)


def expected_concat(chunks, src, dst, table, is_neox):
    """The oracle: re-rotate each chunk alone, then torch.cat (float64)."""
    ks, vs, begin = [], [], 0
    for c in chunks:
        t = c.shape[2]
        s, d = src[begin:begin + t].cpu(), dst[begin:begin + t].cpu()
        ks.append(torch.stack([reference.rope_reposition(c[l, 0].cpu(), s, d, table, is_neox) for l in range(c.shape[0])]))
        vs.append(c[:, 1].cpu().double())
        begin += t
    return torch.cat(ks, dim=1), torch.cat(vs, dim=1)  # [L, N, H, D]


# ------------------------------------------------------------------------ HKVD selection

# fp32 accumulation of H * D non-negative terms vs the float64 reference.
DEV_RTOL = 2e-5


def assert_deviation_close(actual: torch.Tensor, ref: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    a = actual.detach().cpu().double()
    assert a.shape == ref.shape
    assert not torch.isnan(a).any(), "output has NaN (unwritten elements)"
    err = ((a - ref).abs() / ref.abs().clamp_min(1e-30)).max().item() if ref.numel() else 0.0
    assert err <= DEV_RTOL, f"max relative error {err:.3e} > {DEV_RTOL:.1e}"


def strided(t: torch.Tensor, pad_heads: int = 1, pad_dim: int = 8) -> torch.Tensor:
    """The same values in a tensor with padded token and head strides (last dim contiguous)."""
    m, h, d = t.shape
    big = torch.randn(m, h + pad_heads, d + pad_dim, dtype=t.dtype, device=t.device)
    view = big[:, pad_heads:, :d]
    view.copy_(t)
    assert view.stride(-1) == 1 and not view.is_contiguous() or m <= 1
    return view


def selection_masks(n: int, device, forced_frac: float, cand_frac: float | None):
    """Random ``forced`` and ``candidates`` masks ``[n]`` (None: every token a candidate)."""
    forced = torch.rand(n, device=device) < forced_frac
    candidates = None if cand_frac is None else torch.rand(n, device=device) < cand_frac
    return forced, candidates


# ---------------------------------------------------------------- sparse-query attention

# (M, N, Hq, Hkv, D): the sizes, GQA ratios 1, 3, 4, 8 and both head dims.
ATTENTION_CASES = [
    (1, 1, 4, 4, 64),
    (5, 17, 3, 1, 64),
    (64, 17, 8, 2, 128),  # more queries than keys: duplicate positions
    (64, 512, 8, 1, 128),
    (600, 512, 4, 1, 64),
    (5, 4099, 8, 8, 128),
    (600, 4099, 8, 2, 64),
    (1, 4099, 3, 1, 128),
]


def attention_positions(m: int, n: int, sort: bool, device) -> torch.Tensor:
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


def attention_inputs(m, n, hq, hkv, d, dtype, device):
    q = torch.randn(m, hq, d, dtype=dtype, device=device)
    k = torch.randn(n, hkv, d, dtype=dtype, device=device)
    v = torch.randn(n, hkv, d, dtype=dtype, device=device)
    return q, k, v


def check_attention(out, lse, q, k, v, pos, scale=None, q_indptr=None, kv_indptr=None):
    """``out`` (and ``lse`` unless None) of sparse-query attention against the float64 reference."""
    ref_out, ref_lse = reference.sparse_query_attention(q, k, v, pos, scale, q_indptr, kv_indptr)
    # fp16/bf16 kernels round the probabilities to the storage dtype before P @ V.
    factor = 1.0 if q.dtype == torch.float32 else 2.0
    assert_close_to_ref(out, ref_out, q.dtype, factor=factor)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-3, rtol=1e-4)


# ----------------------------------------------------------- serving engines' KV layouts

ENGINE_LAYERS = 2  # make_engine_cache's default

# name: (engine, how its buffers look)
ENGINE_LAYOUTS = {
    "vllm_kv_inner": "vLLM per layer [num_blocks, 2, block_size, H, D]",
    "vllm_kv_outer": "vLLM per layer [2, num_blocks, block_size, H, D]",
    "vllm_all_layers_nhd": "one buffer [num_blocks, L, block_size, H, 2*D]: K and V side by side in the last dim",
    "vllm_all_layers_hnd": "one buffer [num_blocks, L, H, block_size, 2*D]: heads before the block offset",
    "flashinfer_nhd_pair": "FlashInfer K/V pair [pages, page_size, H, D]",
    "flashinfer_hnd_pair": "FlashInfer K/V pair [pages, H, page_size, D]",
    "flashinfer_hnd_single": "FlashInfer one tensor [pages, 2, H, page_size, D]",
    "sglang": "SGLang per-layer token pools [slots, H, D] (page size 1)",
    "misaligned": "[pages, page_size, H, D] views one element off 16-byte alignment (scalar path)",
}


@dataclass
class EngineCache:
    kind: str
    buffers: list  # the engine's own allocations
    num_pages: int
    page_size: int
    layout: str  # what the wrappers are told: "NHD" or "HND"


def make_engine_cache(kind, num_pages, page_size, heads, head_dim, dtype, device="cpu", layers=ENGINE_LAYERS,
                      fill=float("nan")) -> EngineCache:
    """The engine's buffers for ``kind`` (see ENGINE_LAYOUTS), filled with ``fill``."""
    shape_nhd, shape_hnd = (num_pages, page_size, heads, head_dim), (num_pages, heads, page_size, head_dim)
    new = lambda *shape: torch.full(shape, fill, dtype=dtype, device=device)  # noqa: E731
    layout = "HND" if kind.endswith("hnd") or kind.startswith("flashinfer_hnd") else "NHD"
    if kind == "vllm_kv_inner":
        bufs = [new(num_pages, 2, page_size, heads, head_dim) for _ in range(layers)]
    elif kind == "vllm_kv_outer":
        bufs = [new(2, *shape_nhd) for _ in range(layers)]
    elif kind == "vllm_all_layers_nhd":
        bufs = [new(num_pages, layers, page_size, heads, 2 * head_dim)]
    elif kind == "vllm_all_layers_hnd":
        bufs = [new(num_pages, layers, heads, page_size, 2 * head_dim)]
    elif kind == "flashinfer_nhd_pair":
        bufs = [new(*shape_nhd) for _ in range(2 * layers)]
    elif kind == "flashinfer_hnd_pair":
        bufs = [new(*shape_hnd) for _ in range(2 * layers)]
    elif kind == "flashinfer_hnd_single":
        bufs = [new(num_pages, 2, heads, page_size, head_dim) for _ in range(layers)]
    elif kind == "sglang":
        assert page_size == 1
        bufs = [new(num_pages, heads, head_dim) for _ in range(2 * layers)]
    elif kind == "misaligned":
        bufs = [new(num_pages, page_size, heads, head_dim + 1) for _ in range(2 * layers)]
    else:
        raise KeyError(kind)
    return EngineCache(kind, bufs, num_pages, page_size, layout)


def engine_views(cache: EngineCache, layer: int):
    """Layer ``layer``'s K and V as the engine hands them out: views of its buffers in
    the engine's own shape (the wrappers get ``layout=cache.layout``)."""
    b, kind = cache.buffers, cache.kind
    if kind in ("vllm_kv_inner", "flashinfer_hnd_single"):
        return b[layer][:, 0], b[layer][:, 1]
    if kind == "vllm_kv_outer":
        return b[layer][0], b[layer][1]
    if kind.startswith("vllm_all_layers"):
        d = b[0].shape[-1] // 2
        return b[0][:, layer, ..., :d], b[0][:, layer, ..., d:]
    if kind == "misaligned":
        return b[2 * layer][..., 1:], b[2 * layer + 1][..., 1:]
    return b[2 * layer], b[2 * layer + 1]


def engine_kv_arg(cache: EngineCache, layer: int):
    """What an engine passes as one ``kv_cache`` argument: its one tensor with K and V at
    dim 1 (``[pages, 2, ...]``) where it has one, else the (K, V) pair."""
    if cache.kind in ("vllm_kv_inner", "flashinfer_hnd_single"):
        return cache.buffers[layer]
    return engine_views(cache, layer)


# -------------------------------------------------------------- tiny Hugging Face models

def tiny_llama(seed=1234, **overrides):
    """A 4-layer random Llama; ``overrides`` go to its config."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
              initializer_range=0.1, tie_word_embeddings=False, rope_theta=10000.0)
    kw.update(overrides)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**kw)).eval()


def tiny_model(arch: str):
    """A 4-layer random model of ``arch`` (llama, mistral, qwen2 with QKV biases, qwen3 with Q/K norms)."""
    import transformers as tf

    torch.manual_seed(1234)
    common = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.1, tie_word_embeddings=False)
    if arch == "llama":
        cfg = tf.LlamaConfig(rope_theta=10000.0, **common)
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(rope_theta=10000.0, sliding_window=None, **common)
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(rope_theta=1000000.0, **common)
        cls = tf.Qwen2ForCausalLM
    else:
        cfg = tf.Qwen3Config(rope_theta=1000000.0, head_dim=16, **common)
        cls = tf.Qwen3ForCausalLM
    model = cls(cfg).eval()
    if arch == "qwen2":  # make the QKV biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if arch == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.3)
                layer.self_attn.k_norm.weight.normal_(1, 0.3)
    return model


def hf_logits_and_greedy(model, ids: torch.Tensor, steps: int = 32):
    ids = ids.to(model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids[None]).logits[0, -1].float()
        out = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=steps,
                             do_sample=False, pad_token_id=0)
    return logits, out[0, ids.numel():].tolist()


def full_reuse_reference(engine: BlendEngine, prefix: torch.Tensor, chunks: list[ChunkKV], query: torch.Tensor):
    """Prefix prefilled by HF, chunk KV re-rotated to its new positions (float64 reference),
    then the query prefilled by HF on top of that cache: first-token logits."""
    model = engine.model
    dev = model.device
    rope = engine.rope(4096)
    with torch.inference_mode():
        cache_out = model(input_ids=prefix[None].to(dev), use_cache=True)
        base = getattr(cache_out, "cache", None) or cache_out.past_key_values
        keys = [layer.keys[0].transpose(0, 1) for layer in base.layers]
        values = [layer.values[0].transpose(0, 1) for layer in base.layers]
        n = prefix.numel()
        for c in chunks:
            dst = torch.arange(n, n + c.num_tokens)
            for l in range(c.num_layers):
                k = reference.rope_reposition(c.kv[l, 0].cpu(), c.positions.cpu(), dst, rope.cos_sin_cache.cpu(),
                                              True).float().to(dev)
                keys[l] = torch.cat([keys[l], k])
                values[l] = torch.cat([values[l], c.kv[l, 1]])
            n += c.num_tokens
        cache = make_dynamic_cache(model, [k.transpose(0, 1)[None].contiguous() for k in keys],
                                   [v.transpose(0, 1)[None].contiguous() for v in values])
        out = engine.forward(query, torch.arange(n, n + query.numel()), cache)
    return out.logits[0, -1].float()


def assert_logits_close(a, b, tol=2e-4):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max logit error {err:.3e} (scale {scale:.3e})"


def blend_encoded(engine: BlendEngine, prefix, chunks, query, config):
    """The blend of ``prefix + chunks + query`` with every chunk encoded by ``engine`` in
    the context ``config`` gives it: what a chunk store must reproduce."""
    context = engine.chunk_context(prefix, config)
    return engine.blend([prefix] + [engine.encode_chunk(c, context) for c in chunks] + [query], config)
