"""The remote (Redis) tier: round trips, pipelined layer streaming, Redis Cluster, write
policies, every fault (server absent, killed mid-request, stalled, evicted, truncated,
corrupted, foreign values, concurrent writers) and two processes sharing one cache.

Each test runs against a private redis-server on 127.0.0.1 (see conftest.py)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import torch

from cacheblend_ext.store import remote_stream
from cacheblend_ext.cached import CachedBlender
from cacheblend_ext.store.controller import LoadingController, Measurements, measure_tier_throughput
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.store.pipeline import StoreLayerSource, open_layer_source
from cacheblend_ext.testing.redis_server import free_port
from cacheblend_ext.store import ChunkCorruptError, ChunkLoadError, ChunkStore, ChunkUnavailableError
from cacheblend_ext.store.chunk_format import PREFIX
from helpers import DTYPES, blend_encoded, request_parts, tiny_llama

L, T, H, D = 8, 7, 2, 8
S = "tenant-1"  # the scope of every chunk here


def make_kv(seed=0, dtype=torch.float32, layers=L, tokens=T):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(layers, 2, tokens, H, D, generator=g) + 0.5).to(dtype)


def remote_store(url, **kw):
    kw.setdefault("cpu_bytes", 0)  # nothing local: every hit comes from the server
    return ChunkStore("m", "r", remote=url, **kw)


def stream_all(store, keys, pipelined=True):
    """Every layer of ``keys`` through the layer-wise loader, as one request reads them."""
    source, missing = open_layer_source(store, keys, "cpu", pipelined=pipelined, scope=S)
    assert not missing
    try:
        layers = [[t.clone() for t in source.layer(l)] for l in range(source.num_layers)]
    finally:
        source.close()
    return [torch.stack([layers[l][i] for l in range(len(layers))]) for i in range(len(keys))], source.report()


def redis_key(store, key):
    return store.remote.redis_key(S, key)


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_and_layer_stream(redis_url, dtype):
    store = remote_store(redis_url)
    kvs = [make_kv(i, dtype) for i in range(3)]
    keys = [store.put(f"c{i}", kv, torch.arange(T) + 10 * i, token_ids=torch.arange(T) + 100, meta={"i": i},
                      scope=S) for i, kv in enumerate(kvs)]
    assert store.where(keys[0], scope=S) == "remote" and store.keys("cpu", scope=S) == []
    got = store.get(keys[1], scope=S)
    assert torch.equal(got.kv, kvs[1]) and torch.equal(got.positions, torch.arange(T) + 10)
    assert torch.equal(got.token_ids, torch.arange(T) + 100) and got.meta == {"i": 1}
    for pipelined in (True, False):
        loaded, report = stream_all(store, keys, pipelined)
        assert all(torch.equal(a, b) for a, b in zip(loaded, kvs))
        assert report.tiers == {"remote": 3}
        assert report.tier_bytes == {"remote": sum(kv.numel() * kv.element_size() for kv in kvs)}
    st = store.stats()
    assert st["hits"]["remote"] == 1 + 2 * 3 and st["corrupt"] == 0 and st["remote"]["errors"] == 0


def test_values_are_namespaced_by_model_rope_and_format(redis_url):
    store = remote_store(redis_url)
    key = store.put("k", make_kv(), torch.arange(T), scope=S)
    assert redis_key(store, key) == f"cacheblend:v2:{S}:m:r:{key}"
    assert store.remote.client.exists(f"cacheblend:v2:{S}:m:r:{key}")
    for other in (ChunkStore("m2", "r", remote=redis_url), ChunkStore("m", "r2", remote=redis_url),
                  ChunkStore("m", "r", remote=redis_url, remote_namespace="other")):
        assert other.get(key, scope=S) is None and other.stats()["corrupt"] == 0
    assert store.keys("remote", scope=S) == [key]


def test_disk_and_remote_together_and_promotion(redis_url, tmp_path):
    writer = ChunkStore("m", "r", disk_dir=tmp_path / "a", remote=redis_url)
    key = writer.put("k", make_kv(), torch.arange(T), scope=S)
    assert os.path.exists(writer.chunk_path(key, scope=S))
    reader = ChunkStore("m", "r", disk_dir=tmp_path / "b", cpu_bytes=1 << 20, remote=redis_url)
    assert reader.where(key, scope=S) == "remote"
    (handle,) = reader.open_many([key], scope=S)
    source = StoreLayerSource([handle], "cpu")
    for l in range(L):
        assert torch.equal(source.layer(l)[0], make_kv()[l])
    source.close()
    assert reader.where(key, scope=S) == "cpu"  # a fully streamed remote chunk is promoted


def test_write_back(redis_url):
    store = remote_store(redis_url, remote_write="back", write_back_bytes=4 * make_kv().numel())
    keys = [store.put(f"c{i}", make_kv(i), torch.arange(T), scope=S) for i in range(6)]  # more than the queue
    assert store.flush(timeout=30)
    assert store.stats()["remote"]["pending_writes"] == 0
    reader = remote_store(redis_url)
    assert all(torch.equal(reader.get(k, scope=S).kv, make_kv(i)) for i, k in enumerate(keys))
    store.close()


def test_ttl_and_server_eviction_are_plain_misses(private_redis):
    server = private_redis(maxmemory="3mb")
    store = remote_store(server.url, remote_ttl_s=3600)
    first = store.put("first", make_kv(tokens=512), torch.arange(512), scope=S)
    assert 0 < store.remote.client.ttl(redis_key(store, first)) <= 3600
    store.remote.client.pexpire(redis_key(store, first), 1)
    time.sleep(0.01)
    assert store.get(first, scope=S) is None
    keys = [store.put(f"c{i}", make_kv(i, tokens=512), torch.arange(512), scope=S) for i in range(30)]  # 7 > 3 MB
    found = [store.get(k, scope=S) is not None for k in keys]
    assert not found[0] and found[-1]  # least recently used values went first
    st = store.stats()
    assert st["corrupt"] == 0 and st["write_errors"] == 0 and st["remote"]["errors"] == 0


# ---------------------------------------------------------------------------
# bad values
# ---------------------------------------------------------------------------


def _flip(client, rkey, offset):
    byte = client.getrange(rkey, offset, offset)
    client.setrange(rkey, offset, bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("damage", ["truncated", "header", "empty", "other-model", "format-version"])
def test_bad_value_is_a_counted_miss_and_deleted(redis_url, damage):
    store = remote_store(redis_url)
    key = store.put("k", make_kv(), torch.arange(T), scope=S)
    client, rkey = store.remote.client, redis_key(store, key)
    value = client.get(rkey)
    if damage == "truncated":
        client.set(rkey, value[:-5])
    elif damage == "header":
        _flip(client, rkey, PREFIX.size + 10)  # inside the JSON header
    elif damage == "empty":
        client.set(rkey, b"x")
    elif damage == "other-model":  # another model's value for the same chunk key, copied here
        other = ChunkStore("m2", "r", remote=redis_url, cpu_bytes=0)
        other.put(key, make_kv(1), torch.arange(T), scope=S)
        client.set(rkey, client.get(redis_key(other, key)))
    else:  # the same bytes with another format version in the prefix
        client.setrange(rkey, 8, (1).to_bytes(4, "little"))
    assert store.get(key, scope=S) is None and store.open(key, scope=S) is None
    assert store.stats()["corrupt"] >= 1 and not client.exists(rkey)


def test_corrupt_layer_while_streaming(redis_url):
    store = remote_store(redis_url)
    key = store.put("k", make_kv(), torch.arange(T), scope=S)
    client, rkey = store.remote.client, redis_key(store, key)
    handle = store.open(key, scope=S)
    _flip(client, rkey, handle.reader.header.layer_offset(L - 2) + 3)
    source = StoreLayerSource([handle], "cpu", pipelined=True)
    with pytest.raises(ChunkCorruptError, match="layer 6 checksum"):
        for l in range(L):
            source.layer(l)
    source.close()
    assert not client.exists(rkey) and store.stats()["corrupt"] == 1


def test_corrupt_value_replaced_meanwhile_is_not_deleted(redis_url):
    store = remote_store(redis_url)
    key = store.put("k", make_kv(), torch.arange(T), scope=S)
    client, rkey = store.remote.client, redis_key(store, key)
    handle = store.open(key, scope=S)
    # another process replaces the value with a different (valid) encoding of the chunk
    client.delete(rkey)
    remote_store(redis_url).put(key, make_kv(5), torch.arange(T), scope=S)
    with pytest.raises(ChunkCorruptError):
        for l in range(L):
            handle.load_layer(l)
    assert torch.equal(remote_store(redis_url).get(key, scope=S).kv, make_kv(5))  # the new value stays


def test_value_evicted_mid_stream(redis_url):
    store = remote_store(redis_url, remote_in_flight=1)
    keys = [store.put(f"c{i}", make_kv(i), torch.arange(T), scope=S) for i in range(2)]
    source, _ = open_layer_source(store, keys, "cpu", pipelined=False, scope=S)
    source.layer(0)
    store.remote.client.delete(redis_key(store, keys[1]))
    with pytest.raises(ChunkUnavailableError, match="evicted or deleted") as err:
        source.layer(1)
    assert err.value.key == keys[1]
    source.close()
    assert store.stats()["remote"]["lost_mid_read"] == 1 and store.stats()["corrupt"] == 0


# ---------------------------------------------------------------------------
# server faults: absent, killed mid-request, stalled
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_server_absent_at_start(redis_client_module, scheme):
    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    store = remote_store(url, remote_retry_after_s=60)
    key = store.put("k", make_kv(), torch.arange(T), scope=S)  # no exception: the write is counted
    assert store.get(key, scope=S) is None and store.open(key, scope=S) is None
    assert store.where(key, scope=S) is None
    assert time.monotonic() - t0 < 5
    st = store.stats()
    assert st["write_errors"] == 1 and st["remote"]["errors"] >= 1 and st["remote"]["down"]
    assert st["remote"]["skipped_down"] >= 2  # after the first failure nothing waits on the network


def test_server_killed_mid_request(private_redis):
    server = private_redis()
    store = remote_store(server.url, remote_in_flight=2)
    keys = [store.put(f"c{i}", make_kv(i), torch.arange(T), scope=S) for i in range(3)]
    source, _ = open_layer_source(store, keys, "cpu", pipelined=False, scope=S)
    source.layer(0)
    source.layer(1)
    server.kill()
    t0 = time.monotonic()
    with pytest.raises(ChunkUnavailableError, match="could not be loaded"):
        for l in range(2, L):
            source.layer(l)
    source.close()
    assert time.monotonic() - t0 < 5
    assert store.stats()["remote"]["errors"] >= 1 and store.stats()["load_failures"] == 1


def test_stalled_server_times_out(private_redis):
    server = private_redis()
    store = remote_store(server.url, remote_timeout_s=0.3, remote_in_flight=1)
    key = store.put("k", make_kv(), torch.arange(T), scope=S)
    handle = store.open(key, scope=S)  # the header is read; the server stalls before any layer is
    # (pausing after a first layer raced with the prefetcher, which can fetch every layer first)
    server.client().execute_command("CLIENT", "PAUSE", 3000, "ALL")
    t0 = time.monotonic()
    source = StoreLayerSource([handle], "cpu", pipelined=True)
    with pytest.raises(ChunkUnavailableError):
        for l in range(L):
            source.layer(l)
    source.close()
    assert time.monotonic() - t0 < 2.5
    assert store.stats()["remote"]["timeouts"] >= 1
    t0 = time.monotonic()
    assert store.get(key, scope=S) is None  # marked down: a miss without waiting
    assert time.monotonic() - t0 < 0.1


# ---------------------------------------------------------------------------
# concurrent writers
# ---------------------------------------------------------------------------


def _racing_writer(url, seed, barrier, seconds):
    store = ChunkStore("m", "r", cpu_bytes=0, remote=url, pin_memory=False)
    kv = make_kv(seed, tokens=256)
    barrier.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        store.remote.client.delete(store.remote.redis_key(S, "same"))
        store.put("same", kv, torch.arange(256), scope=S)


@pytest.mark.slow
def test_two_processes_writing_one_chunk(redis_url):
    """Two writers race on one key, with different bytes (a stronger test than equal KV):
    every read returns one writer's value entirely or fails with a counted error."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_racing_writer, args=(redis_url, seed, barrier, 1.0)) for seed in (1, 2)]
    for p in procs:
        p.start()
    store = remote_store(redis_url)
    valid = [make_kv(1, tokens=256), make_kv(2, tokens=256)]
    complete, failed = 0, 0
    barrier.wait()
    while any(p.is_alive() for p in procs):
        got = store.get("same", scope=S)
        if got is not None:
            assert any(torch.equal(got.kv, v) for v in valid)
            complete += 1
        try:
            handle = store.open("same", scope=S)
            if handle is not None:
                source = StoreLayerSource([handle], "cpu", pipelined=True)
                layers = torch.stack([source.layer(l)[0].clone() for l in range(L)])
                source.close()
                assert any(torch.equal(layers, v) for v in valid)
                complete += 1
        except ChunkLoadError:
            failed += 1
            source.close()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert complete > 0, "no read completed while the writers raced"
    final = remote_store(redis_url).get("same", scope=S)
    assert final is None or any(torch.equal(final.kv, v) for v in valid)


# ---------------------------------------------------------------------------
# Redis Cluster
# ---------------------------------------------------------------------------


def test_cluster_spreads_chunks_and_streams_them(redis_cluster):
    store = remote_store(redis_cluster.url)
    store.clear(("remote",), scope=S)
    kvs = [make_kv(i) for i in range(12)]
    keys = [store.put(f"chunk{i}", kv, torch.arange(T), scope=S) for i, kv in enumerate(kvs)]
    per_node = [n.client().dbsize() for n in redis_cluster.nodes]
    assert sum(per_node) == 12 and all(n > 0 for n in per_node), per_node
    loaded, report = stream_all(store, keys)
    assert all(torch.equal(a, b) for a, b in zip(loaded, kvs)) and report.tiers == {"remote": 12}
    assert torch.equal(store.get(keys[5], scope=S).kv, kvs[5])
    assert sorted(store.keys("remote", scope=S)) == sorted(keys)
    store.clear(("remote",), scope=S)
    assert sum(n.client().dbsize() for n in redis_cluster.nodes) == 0


# ---------------------------------------------------------------------------
# the blend engine on the remote tier
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    return BlendEngine(tiny_llama())


CFG = BlendConfig(recompute_ratio=0.3)


def _inject_at_layer(monkeypatch, layer, fault):
    original = remote_stream.RemoteLayerStream.read_layer
    fired = []

    def read_layer(self, l):
        if l == layer and not fired:
            fired.append(1)
            fault(self)
        return original(self, l)

    monkeypatch.setattr(remote_stream.RemoteLayerStream, "read_layer", read_layer)
    return fired


@pytest.mark.parametrize("fault", ["killed", "stalled", "evicted", "corrupted"])
def test_blend_survives_remote_faults(engine, private_redis, monkeypatch, fault):
    server = private_redis()
    prefix, chunks, query = request_parts(4)
    ref = blend_encoded(engine, prefix, chunks, query, CFG)
    CachedBlender(engine, remote=server.url).add_many(chunks, prefix, scope=S)
    store = ChunkStore(engine.identity.model_id, engine.identity.rope_id, cpu_bytes=0, remote=server.url,
                       remote_timeout_s=0.3, remote_in_flight=1)
    blender = CachedBlender(engine, store)

    def inject(stream):
        rkey = stream.chunks[1].rkey
        if fault == "killed":
            server.kill()
        elif fault == "stalled":
            server.client().execute_command("CLIENT", "PAUSE", 2000, "ALL")
        elif fault == "evicted":
            server.client().delete(rkey)
        else:
            _flip(server.client(), rkey, stream.chunks[1].header.layer_offset(3) + 1)

    fired = _inject_at_layer(monkeypatch, 2, inject)
    t0 = time.monotonic()
    result, report = blender.blend(prefix, chunks, query, CFG, scope=S)
    assert fired and time.monotonic() - t0 < 10
    assert torch.equal(result.logits, ref.logits)  # recomputed, never wrong KV
    assert "encoded" in report.tiers
    st = store.stats()
    assert st["load_failures"] + st["corrupt"] >= 1


def test_blend_with_the_server_absent(redis_client_module, engine):
    prefix, chunks, query = request_parts(6)
    blender = CachedBlender(engine, remote=f"redis://127.0.0.1:{free_port()}/0", cpu_bytes=0)
    result, report = blender.blend(prefix, chunks, query, CFG, scope=S)
    assert torch.equal(result.logits, blend_encoded(engine, prefix, chunks, query, CFG).logits)
    assert report.tiers == {"encoded": 3} and blender.store.stats()["remote"]["errors"] >= 1


def test_blend_from_cluster_and_controller_learns_remote(engine, redis_cluster):
    prefix, chunks, query = request_parts(7)
    CachedBlender(engine, remote=redis_cluster.url).add_many(chunks, prefix, scope=S)
    ctl = LoadingController(Measurements(prefill_a_ms=0.01, kv_bytes_per_layer_token=512, tier_gbps={"cpu": 1.0}))
    blender = CachedBlender(engine, remote=redis_cluster.url, cpu_bytes=0, controller=ctl)
    result, report = blender.blend(prefix, chunks, query, CFG, scope=S)
    assert report.tiers == {"remote": 3}
    assert torch.equal(result.logits, blend_encoded(engine, prefix, chunks, query, CFG).logits)
    assert ctl.m.tier_gbps["remote"] > 0
    assert ctl.choose_ratio(100, "remote").inputs["tier_gbps"]["remote"] == ctl.m.tier_gbps["remote"]


def test_measured_remote_throughput(redis_url):
    gbps = measure_tier_throughput("remote", "cpu", torch.float16, remote=redis_url, num_layers=4, tokens=256,
                                   heads=2, head_dim=64, reps=2)
    assert 0 < gbps < 1000
    assert remote_store(redis_url).keys("remote", scope=S) == []  # the calibration value is gone


_PROCESS_B = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from helpers import tiny_llama
from cacheblend_ext.cached import CachedBlender
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
request = torch.load(sys.argv[3])
engine = BlendEngine(tiny_llama())
blender = CachedBlender(engine, remote=sys.argv[2], cpu_bytes=0)  # its own store, nothing local
result, report = blender.blend(request["prefix"], request["chunks"], request["query"], BlendConfig(recompute_ratio=0.3),
                               scope="tenant-1")
torch.save({"logits": result.logits, "tiers": report.tiers, "stats": blender.store.stats()}, sys.argv[4])
"""


@pytest.mark.slow
def test_two_processes_one_cache(engine, redis_url, tmp_path):
    """Process A (this one) encodes and stores; interpreter B blends from the remote alone."""
    prefix, chunks, query = request_parts(8)
    blender_a = CachedBlender(engine, remote=redis_url, cpu_bytes=0)
    blender_a.add_many(chunks, prefix, scope=S)
    result_a, _ = blender_a.blend(prefix, chunks, query, CFG, scope=S)
    torch.save({"prefix": prefix, "chunks": chunks, "query": query}, tmp_path / "request.pt")
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", _PROCESS_B, here, redis_url, str(tmp_path / "request.pt"),
                    str(tmp_path / "b.pt")], check=True, timeout=300)
    b = torch.load(tmp_path / "b.pt")
    assert b["tiers"] == {"remote": 3}
    assert b["stats"]["puts"] == 0 and b["stats"]["hits"]["remote"] == 3  # B encoded nothing
    assert torch.equal(b["logits"], result_a.logits)


# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------


def test_bad_remote_arguments(redis_url):
    import redis

    with pytest.raises(ValueError, match="remote URL must start with"):
        ChunkStore(remote="http://127.0.0.1:6379")
    with pytest.raises(TypeError, match="remote must be a redis URL or a redis client"):
        ChunkStore(remote=42)
    with pytest.raises(ValueError, match="decode_responses"):
        ChunkStore(remote=redis.Redis.from_url(redis_url, decode_responses=True))
    with pytest.raises(ValueError, match="remote_write"):
        ChunkStore(remote=redis_url, remote_write="sideways")
    with pytest.raises(ValueError, match="remote_in_flight"):
        ChunkStore(remote=redis_url, remote_in_flight=0)
    with pytest.raises(ValueError, match="remote_ttl_s"):
        ChunkStore(remote=redis_url, remote_ttl_s=0)
    client = redis.Redis.from_url(redis_url, socket_timeout=2)  # a client object works as is
    store = ChunkStore("m", "r", cpu_bytes=0, remote=client)
    assert torch.equal(store.get(store.put("k", make_kv(), torch.arange(T), scope=S), scope=S).kv, make_kv())
