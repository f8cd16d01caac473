"""The blend engine fed from the chunk store: chunks loaded from disk (pipelined or not)
give the same result as chunks in memory; corruption never reaches the caller."""

from __future__ import annotations

import os

import pytest
import torch

import cacheblend_ext.blend.engine as engine_mod
from cacheblend_ext.cached import CachedBlender
from cacheblend_ext.store import FILE_SUFFIX
from helpers import DEVICES, request_parts

S = "tenant-1"  # the scope of every chunk here


def tiny_llama(device):
    import transformers as tf

    torch.manual_seed(1234)
    cfg = tf.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.1, tie_word_embeddings=False, rope_theta=10000.0)
    return tf.LlamaForCausalLM(cfg).eval().to(device)


def reference(engine, prefix, chunks, query, cfg):
    """The in-memory blend: chunks encoded as the config prescribes for ``prefix``."""
    context = engine.chunk_context(prefix, cfg)
    return engine.blend(([] if prefix is None else [prefix]) + [engine.encode_chunk(c, context) for c in chunks]
                        + [query], cfg)


def assert_same(result, ref):
    assert torch.equal(result.logits, ref.logits)
    assert torch.equal(result.input_ids, ref.input_ids)
    for a, b in zip(result.selected, ref.selected):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.fixture(scope="module", params=DEVICES)
def engine(request):
    return engine_mod.BlendEngine(tiny_llama(request.param))


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "sync"])
def test_blend_from_disk_equals_blend_from_memory(tmp_path, engine, pipelined):
    cfg = engine_mod.BlendConfig(recompute_ratio=0.3)
    prefix, chunks, query = request_parts()
    ref = reference(engine, prefix, chunks, query, cfg)
    CachedBlender(engine, disk_dir=tmp_path).add_many(chunks, prefix, scope=S)
    # a fresh store (as after a restart) with no memory tier: every chunk streams from disk
    blender = CachedBlender(engine, disk_dir=tmp_path, cpu_bytes=0, pipelined=pipelined)
    result, report = blender.blend(prefix, chunks, query, cfg, scope=S)
    assert report.tiers == {"disk": 3} and report.num_layers == engine.num_layers
    assert result.timings["load"]["mode"] == ("pipelined" if pipelined else "sync")
    assert_same(result, ref)
    # any subset, any order
    sub = [chunks[2], chunks[0]]
    assert_same(blender.blend(prefix, sub, query, cfg, scope=S)[0], reference(engine, prefix, sub, query, cfg))


def test_memory_tier_and_misses(tmp_path, engine):
    cfg = engine_mod.BlendConfig(recompute_ratio=0.15)
    prefix, chunks, query = request_parts(1)
    blender = CachedBlender(engine)  # memory only
    result, report = blender.blend(None, chunks, query, cfg, scope=S)  # all misses: encoded, stored, used as encoded
    assert report.tiers == {"encoded": 3}
    ref = engine.blend([engine.encode_chunk(c) for c in chunks] + [query], cfg)
    assert_same(result, ref)
    assert blender.store.stats()["puts"] == 3
    result, report = blender.blend(None, chunks, query, cfg, scope=S)  # now all hits
    assert set(report.tiers) <= {"cpu", "gpu"} and sum(report.tiers.values()) == 3
    assert_same(result, ref)
    assert blender.store.stats()["puts"] == 3


def test_corrupt_file_is_reencoded_transparently(tmp_path, engine):
    cfg = engine_mod.BlendConfig(recompute_ratio=0.3)
    prefix, chunks, query = request_parts(2)
    ref = reference(engine, prefix, chunks, query, cfg)
    keys = CachedBlender(engine, disk_dir=tmp_path).add_many(chunks, prefix, scope=S)
    blender = CachedBlender(engine, disk_dir=tmp_path, cpu_bytes=0)
    path = blender.store.chunk_path(keys[1], scope=S)
    data = bytearray(path.read_bytes())
    data[len(data) - 16 * chunks[1].numel() - 100] ^= 0x20  # in the last layer's V (tail: positions + ids)
    path.write_bytes(bytes(data))
    result, report = blender.blend(prefix, chunks, query, cfg, scope=S)  # no exception
    assert_same(result, ref)
    assert blender.store.stats()["corrupt"] == 1
    assert os.path.exists(path)  # re-encoded and stored again
    # truncated file: a miss at open time, re-encoded as well
    with open(path, "r+b") as f:
        f.truncate(100)
    assert_same(blender.blend(prefix, chunks, query, cfg, scope=S)[0], ref)
