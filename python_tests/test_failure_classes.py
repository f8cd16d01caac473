"""Failure classes that CacheBlend implementations have shipped broken, each compared with
full prefill at ratio 1 (or full KV reuse at ratio 0) or expected to fail with a clear
error: repeated requests, reordered and repeated chunks, query-only requests, empty
chunks, requests past the model's positions, foreign chunk KV and chunk KV in another
dtype. Tiny random Llama / Qwen3 models on the CPU, through the engine and the store."""

from __future__ import annotations

import pytest
import torch

from cacheblend_ext.cached import CachedBlender
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine

from helpers import assert_logits_close, full_reuse_reference, hf_logits_and_greedy, request_parts, tiny_model

ONE = BlendConfig(recompute_ratio=1.0)
ZERO = BlendConfig(recompute_ratio=0.0)
S = "tenant-1"  # the scope of every chunk here


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return tiny_model(request.param)


def hf_first_logits(model, ids):
    return hf_logits_and_greedy(model, ids, steps=1)[0]


def assert_same_blend(a, b):
    assert torch.equal(a.logits, b.logits)
    for x, y in zip(a.selected, b.selected):
        assert (x is None and y is None) or torch.equal(x, y)


def test_same_request_twice_on_one_engine(model, tmp_path):
    """No state leaks from one request into the next: the second blend of the same request
    equals the first (engine and store), and at ratio 1 both equal full prefill."""
    engine = BlendEngine(model)
    prefix, chunk_ids, query = request_parts(seed=40)
    chunks = engine.encode_chunks(chunk_ids, context=engine.chunk_context(prefix))
    first = engine.blend([prefix, *chunks, query])
    assert_same_blend(engine.blend([prefix, *chunks, query]), first)
    blender = CachedBlender(engine, disk_dir=tmp_path)
    stored_first, report1 = blender.blend(prefix, chunk_ids, query, scope=S)
    stored_second, report2 = blender.blend(prefix, chunk_ids, query, scope=S)
    assert report1.tiers == {"encoded": 3} and "encoded" not in report2.tiers
    assert_same_blend(stored_first, first)
    assert_same_blend(stored_second, first)
    ref = hf_first_logits(model, torch.cat([prefix, *chunk_ids, query]))
    for _ in range(2):
        assert_logits_close(blender.blend(prefix, chunk_ids, query, ONE, scope=S)[0].logits, ref)


def test_cached_chunks_reordered(model, tmp_path):
    """Chunks stored in one order and used in another: each is re-rotated to its new place
    (ratio 1: full prefill of the new order; ratio 0: full reuse at the new positions)."""
    engine = BlendEngine(model)
    prefix, chunk_ids, query = request_parts(seed=41)
    blender = CachedBlender(engine, disk_dir=tmp_path)
    blender.add_many(chunk_ids, prefix, scope=S)
    for order in ([2, 0, 1], [1, 2, 0]):
        texts = [chunk_ids[i] for i in order]
        result, report = blender.blend(prefix, texts, query, ONE, scope=S)
        assert "encoded" not in report.tiers
        assert_logits_close(result.logits, hf_first_logits(model, torch.cat([prefix, *texts, query])))
        zero, _ = blender.blend(prefix, texts, query, ZERO, scope=S)
        chunks = engine.encode_chunks(texts, context=engine.chunk_context(prefix, ZERO))
        assert_logits_close(zero.logits, full_reuse_reference(engine, prefix, chunks, query))


def test_same_chunk_twice_in_one_request(model, tmp_path):
    """One stored chunk placed at two positions of one request (one KV, two rotations)."""
    engine = BlendEngine(model)
    prefix, chunk_ids, query = request_parts(seed=42)
    texts = [chunk_ids[0], chunk_ids[1], chunk_ids[0]]
    ids = torch.cat([prefix, *texts, query])
    chunk = engine.encode_chunk(chunk_ids[0], engine.chunk_context(prefix))
    other = engine.encode_chunk(chunk_ids[1], engine.chunk_context(prefix))
    segments = [prefix, chunk, other, chunk, query]
    assert_logits_close(engine.blend(segments, ONE).logits, hf_first_logits(model, ids))
    assert_logits_close(engine.blend(segments, ZERO).logits,
                        full_reuse_reference(engine, prefix, [chunk, other, chunk], query))
    blender = CachedBlender(engine, disk_dir=tmp_path, cpu_bytes=0)
    result, report = blender.blend(prefix, texts, query, ONE, scope=S)
    assert blender.store.stats()["puts"] == 2  # the repeated chunk is encoded and stored once
    assert_logits_close(result.logits, hf_first_logits(model, ids))
    zero, _ = blender.blend(prefix, texts, query, ZERO, scope=S)
    assert_same_blend(zero, engine.blend(segments, ZERO))


def test_query_only_request(model):
    """No chunk at all: the blend is a plain prefill at every ratio and under every scheme."""
    engine = BlendEngine(model)
    prefix, _, query = request_parts(seed=43)
    ids = torch.cat([prefix, query])
    ref_logits, ref_tokens = hf_logits_and_greedy(model, ids, steps=8)
    for cfg in (BlendConfig(), ZERO, BlendConfig.published(0.15)):
        result = engine.blend([prefix, query], cfg)
        assert_logits_close(result.logits, ref_logits)
        assert engine.generate(result, 8) == ref_tokens
        only = engine.blend([query], cfg)
        assert_logits_close(only.logits, hf_first_logits(model, query))
    result, report = CachedBlender(engine).blend(prefix, [], query, scope=S)
    assert report.tiers == {} and result.num_tokens == ids.numel()
    assert_logits_close(result.logits, ref_logits)


def test_empty_chunk_is_a_clear_error(model):
    engine = BlendEngine(model)
    prefix, chunk_ids, query = request_parts(seed=44)
    with pytest.raises(ValueError, match="empty chunk"):
        engine.encode_chunk([])
    blender = CachedBlender(engine)
    with pytest.raises(ValueError, match=r"chunks\[1\] is empty"):
        blender.blend(prefix, [chunk_ids[0], [], chunk_ids[1]], query, scope=S)
    with pytest.raises(ValueError, match=r"chunks\[0\] is empty"):
        blender.add_many([torch.tensor([], dtype=torch.int64)], scope=S)
    assert blender.store.stats()["puts"] == 0  # nothing half-stored
    with pytest.raises(ValueError, match="empty request"):
        engine.blend([[], []])


def test_request_past_the_models_positions_is_a_clear_error(model):
    """The tiny models have 1024 positions: a request (or a chunk) that needs more is
    refused before any compute, naming the limit."""
    engine = BlendEngine(model)
    limit = model.config.max_position_embeddings
    prefix, chunk_ids, query = request_parts(seed=45, sizes=(600, 500))
    chunks = engine.encode_chunks(chunk_ids)
    with pytest.raises(ValueError, match=f"request of {3 + 1100 + 8} tokens.*max_position_embeddings \\({limit}\\)"):
        engine.blend([prefix, *chunks, query])
    with pytest.raises(ValueError, match=f"max_position_embeddings \\({limit}\\)"):
        engine.full_prefill([prefix, *chunk_ids, query])
    with pytest.raises(ValueError, match=f"chunk of {limit} tokens after 1 context tokens.*\\({limit}\\)"):
        engine.encode_chunk(torch.full((limit,), 5))
    fits = engine.blend([prefix, chunks[0], query])  # just under the limit: fine
    assert fits.num_tokens == 3 + 600 + 8


def test_chunk_of_another_model_is_refused_by_the_engine(model):
    """In-memory chunk KV from another model's engine (or another RoPE, another dtype's
    identity) is refused by its key, not blended into wrong answers."""
    ours = BlendEngine(model)
    other = tiny_model("llama" if model.config.model_type == "qwen3" else "qwen3")
    theirs = BlendEngine(other)
    prefix, chunk_ids, query = request_parts(seed=46)
    foreign = theirs.encode_chunk(chunk_ids[0])
    mine = ours.encode_chunk(chunk_ids[1])
    with pytest.raises(ValueError, match="segments\\[1\\].*not encoded by this model"):
        ours.blend([prefix, foreign, mine, query])
    with pytest.raises(ValueError, match="segments\\[1\\].*not encoded by this model"):
        ours.blend([prefix, foreign, mine, query], ONE)  # even where its KV would go unused


def test_chunk_kv_in_another_dtype(model):
    """A chunk whose KV tensor was cast to another dtype (e.g. kept in bf16 to save
    memory) is cast to the model's dtype as it is placed: ratio 1 is full prefill, ratio 0
    is full reuse of the cast KV, and the result is close to the uncast chunk's."""
    engine = BlendEngine(model)
    prefix, chunk_ids, query = request_parts(seed=47)
    chunks = engine.encode_chunks(chunk_ids, context=engine.chunk_context(prefix))
    cast = [c.to(c.kv.device, torch.bfloat16) for c in chunks]
    assert all(c.kv.dtype == torch.bfloat16 for c in cast)
    ids = torch.cat([prefix, *chunk_ids, query])
    assert_logits_close(engine.blend([prefix, *cast, query], ONE).logits, hf_first_logits(model, ids))
    back = [c.to(c.kv.device, torch.float32) for c in cast]
    assert_logits_close(engine.blend([prefix, *cast, query], ZERO).logits,
                        full_reuse_reference(engine, prefix, back, query))
    blended = engine.blend([prefix, *cast, query])
    exact = engine.blend([prefix, *chunks, query])
    assert (blended.logits - exact.logits).abs().max() < 0.05 * exact.logits.abs().max()
