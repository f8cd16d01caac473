"""One chunk identity: the engine, the store and CachedBlender agree on keys, and KV
encoded by another model or with another RoPE scaling is refused by its key."""

from __future__ import annotations

import pytest
import torch

from cacheblend_ext.cached import CachedBlender
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.identity import ModelIdentity, chunk_key
from cacheblend_ext.store import ChunkStore
from helpers import request_parts, tiny_llama

S = "tenant-1"  # the scope of every chunk here


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_engine_store_and_blender_use_one_key(model, tmp_path):
    engine = BlendEngine(model)
    ids = torch.tensor([5, 6, 7, 8])
    chunk = engine.encode_chunk(ids)
    assert chunk.key == engine.chunk_key(ids, [1]) == engine.identity.chunk_key(torch.float32, ids, [1])
    assert chunk.key == chunk_key(engine.identity.model_id, engine.identity.rope_id, torch.float32, ids, [1])
    blender = CachedBlender(engine, disk_dir=tmp_path)
    assert blender.key(ids) == chunk.key
    assert blender.store.identity == engine.identity
    assert blender.store.key_for(ids, torch.float32, prefix_ids=engine.chunk_prefix_ids()) == chunk.key
    assert engine.chunk_prefix_ids() == engine.bos_ids() == [1]
    assert BlendEngine(model, config=BlendConfig(chunk_prefix="none")).chunk_prefix_ids() == []
    # the same weights loaded again (another process, another machine) give the same keys
    assert BlendEngine(tiny_llama()).encode_chunk(ids).key == chunk.key


def test_prefix_ids_are_part_of_the_key(model):
    engine = BlendEngine(model)
    ids = [5, 6, 7]
    keys = {engine.chunk_key(ids), engine.chunk_key(ids, [1]), engine.chunk_key(ids, [1, 9]),
            engine.chunk_key([9] + ids, [1])}
    assert len(keys) == 4
    assert engine.encode_chunk(ids).key == engine.chunk_key(ids, [1])
    assert engine.encode_prefix([torch.tensor(ids)]).key == engine.chunk_key(ids, [])


@pytest.mark.parametrize("other", ["weights", "rope-scaling", "rope-theta"])
def test_chunk_of_another_model_or_rope_is_refused(model, tmp_path, other):
    ours = BlendEngine(model)
    if other == "weights":
        theirs_model = tiny_llama(seed=99)  # same config, other weights
    else:
        change = ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}} if other == "rope-scaling"
                  else {"rope_theta": 500000.0})
        theirs_model = tiny_llama(**change)
        theirs_model.load_state_dict(model.state_dict())  # the same weights
    theirs = BlendEngine(theirs_model)
    assert theirs.identity != ours.identity
    ids = torch.tensor([5, 6, 7, 8, 9])
    foreign = theirs.encode_chunk(ids)
    # 1. their key is not ours: a lookup by our key never finds their KV
    assert foreign.key != ours.chunk_key(ids, [1])
    with pytest.raises(ValueError, match="not encoded by this model"):
        ours.identity.check_chunk(foreign, ours.dtype)
    ours.identity.check_chunk(ours.encode_chunk(ids), ours.dtype)
    # 2. one disk directory shared by both: each model only ever reuses its own chunks
    prefix, chunks, query = request_parts(3)
    cfg = BlendConfig(recompute_ratio=0.3)
    CachedBlender(theirs, disk_dir=tmp_path).add_many(chunks, prefix, scope=S)
    blender = CachedBlender(ours, disk_dir=tmp_path, cpu_bytes=0)
    result, report = blender.blend(prefix, chunks, query, cfg, scope=S)
    assert report.tiers == {"encoded": 3}  # nothing of theirs was reused
    ref = ours.blend([prefix] + [ours.encode_chunk(c, ours.chunk_context(prefix, cfg)) for c in chunks] + [query], cfg)
    assert torch.equal(result.logits, ref.logits)
    # 3. their KV written under our key (a buggy writer) is refused by the identity in its header
    our_key = ours.chunk_key(ids, [1])
    shared = tmp_path / "shared"
    theirs_store = ChunkStore(theirs.identity.model_id, theirs.identity.rope_id, disk_dir=shared, cpu_bytes=0)
    theirs_store.put(our_key, foreign.kv, foreign.positions, foreign.token_ids, scope=S)
    store = ChunkStore(ours.identity.model_id, ours.identity.rope_id, disk_dir=shared, cpu_bytes=0)
    assert store.get(our_key, scope=S) is None and store.stats()["corrupt"] == 1


def test_blender_refuses_a_store_of_another_identity(model):
    engine = BlendEngine(model)
    with pytest.raises(ValueError, match="store holds KV of"):
        CachedBlender(engine, ChunkStore("m-other", engine.identity.rope_id))
    CachedBlender(engine, ChunkStore(engine.identity.model_id, engine.identity.rope_id))


def test_explicit_model_id_overrides_the_fingerprint(model):
    engine = BlendEngine(model, model_id="my-model@rev3")
    assert engine.identity == ModelIdentity("my-model@rev3", BlendEngine(model).identity.rope_id)
    assert engine.model_id == "my-model@rev3"
