"""Scopes: the same text stored in two scopes is two entries in every tier (GPU, CPU
memory, disk, Redis); a lookup never finds another scope's chunk, and it does exactly
what a lookup of a chunk nobody stored does (the same Redis commands, the same files
opened, the same counters), so its cost is that of a miss. Sharing happens only in a
scope the caller names (``public``); the API has no default scope."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from cacheblend_ext import PUBLIC_SCOPE, check_scope
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.cached import CachedBlender
from cacheblend_ext.store import ChunkStore
from helpers import DEVICES, blend_encoded, request_parts, tiny_llama

L, T, H, D = 4, 9, 2, 8
A, B = "tenant-a", "tenant-b"


def make_kv(seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, 2, T, H, D, generator=g) + 0.5).to(device)


# ---------------------------------------------------------------------------
# what a lookup does, per tier
# ---------------------------------------------------------------------------

_AUDIT: list = []  # (event, first argument) while a trace is recorded; the hook stays (it cannot be removed)
_RECORDING = [False]


def _audit(event, args):
    if _RECORDING[0] and event in ("open", "os.listdir", "os.scandir", "os.remove", "os.rename", "os.mkdir"):
        _AUDIT.append((event, str(args[0]) if args else ""))


sys.addaudithook(_audit)


def _commandstats(client) -> dict:
    return {name: v["calls"] for name, v in client.info("commandstats").items()}


def _counters(store) -> dict:
    """The store's counters, flattened (``hits.disk``, ``remote.misses``, ...)."""
    st = store.stats()
    out = {f"hits.{t}": n for t, n in st["hits"].items()}
    out.update(misses=st["misses"], corrupt=st["corrupt"], bad_mac=st["bad_mac"])
    out.update({f"remote.{k}": v for k, v in st.get("remote", {}).items() if k != "down"})
    return out


def trace(store, lookup, admin=None) -> dict:
    """What ``lookup()`` did: its result (a miss is ``None``), the store's counters that
    moved, the files it opened or listed (paths relative to the disk tier, scope and key
    names replaced), and the Redis commands it sent."""
    before, cmds = _counters(store), _commandstats(admin) if admin is not None else {}
    _AUDIT.clear()
    _RECORDING[0] = True
    try:
        found = lookup()
    finally:
        _RECORDING[0] = False
    after = _counters(store)
    moved = {k: after[k] - before[k] for k in after if before[k] != after[k]}
    files = []
    root = str(store.disk_dir) if store.disk_dir is not None else None
    for event, path in _AUDIT:
        if root is not None and path.startswith(root):
            files.append((event, os.path.exists(path)))
    out = {"found": found is not None, "moved": moved, "files": files}
    if admin is not None:
        now = _commandstats(admin)
        out["redis"] = {k: now[k] - cmds.get(k, 0) for k in now if now[k] != cmds.get(k, 0) and k != "cmdstat_info"}
    return out


def tier_store(tier, tmp_path, redis_url=None):
    if tier == "gpu":
        return ChunkStore("m", "r", gpu_bytes=1 << 20, cpu_bytes=0)
    if tier == "cpu":
        return ChunkStore("m", "r", cpu_bytes=1 << 20)
    if tier == "disk":
        return ChunkStore("m", "r", cpu_bytes=0, disk_dir=tmp_path / "disk")
    return ChunkStore("m", "r", cpu_bytes=0, remote=redis_url)


TIERS = [pytest.param("gpu", marks=DEVICES[1].marks), "cpu", "disk", "remote"]


@pytest.mark.parametrize("tier", TIERS)
def test_two_scopes_same_text_in_every_tier(request, tmp_path, tier):
    redis_url = request.getfixturevalue("redis_url") if tier == "remote" else None
    store = tier_store(tier, tmp_path, redis_url)
    device = "cuda" if tier == "gpu" else "cpu"
    key = store.put("same-text", make_kv(1, device), torch.arange(T), scope=A)
    assert store.where(key, scope=A) == tier
    assert store.where(key, scope=B) is None and (B, key) not in store
    assert store.get(key, scope=B) is None and store.open(key, scope=B) is None  # no cross-scope hit
    store.put(key, make_kv(2, device), torch.arange(T), scope=B)  # B's own copy of the same text
    assert store.keys(tier, scope=A) == [key] and store.keys(tier, scope=B) == [key]  # two entries
    assert torch.equal(store.get(key, scope=A).kv.cpu(), make_kv(1))
    assert torch.equal(store.get(key, scope=B).kv.cpu(), make_kv(2))
    if tier == "disk":
        assert store.chunk_path(key, scope=A) != store.chunk_path(key, scope=B)
        assert os.path.exists(store.chunk_path(key, scope=A)) and os.path.exists(store.chunk_path(key, scope=B))
    if tier == "remote":
        assert store.remote.client.exists(store.remote.redis_key(A, key), store.remote.redis_key(B, key)) == 2
    store.remove(key, scope=A)
    assert store.where(key, scope=A) is None and store.where(key, scope=B) == tier
    assert store.stats()["corrupt"] == 0


@pytest.mark.parametrize("tier", TIERS)
def test_lookup_of_another_scopes_chunk_costs_a_miss(request, tmp_path, tier):
    """A's chunk looked up from scope B does exactly what a lookup of a key nobody stored
    does: the same counters, the same (absent) files opened, the same Redis commands."""
    admin = None
    if tier == "remote":
        redis_url = request.getfixturevalue("redis_url")
        admin = request.getfixturevalue("redis_server").client()
    else:
        redis_url = None
    store = tier_store(tier, tmp_path, redis_url)
    device = "cuda" if tier == "gpu" else "cpu"
    key = store.put("private-text", make_kv(1, device), torch.arange(T), scope=A)
    store.put("warm-up", make_kv(3, device), torch.arange(T), scope=B)  # B's folder and connection exist
    assert store.get("warm-up", scope=B) is not None
    for lookup in ("get", "open"):
        other_scope = trace(store, lambda: getattr(store, lookup)(key, scope=B), admin)
        nobody = trace(store, lambda: getattr(store, lookup)("never-stored", scope=B), admin)
        assert other_scope == nobody, (lookup, other_scope, nobody)
        assert not other_scope["found"] and "misses" in other_scope["moved"]
        assert all(not exists for _, exists in other_scope["files"])  # only B's (absent) path was opened
        if tier == "disk":
            assert other_scope["files"], "the disk lookup opened nothing: the trace is not recording"
        if tier == "remote":
            assert other_scope["redis"], "no Redis command was recorded"
    hit = trace(store, lambda: store.get(key, scope=A), admin)
    assert hit["found"] and hit != trace(store, lambda: store.get("never-stored", scope=A), admin)


# ---------------------------------------------------------------------------
# the API: no default scope, checked names
# ---------------------------------------------------------------------------


def test_scope_is_required_and_checked(tmp_path):
    store = ChunkStore("m", "r", disk_dir=tmp_path)
    with pytest.raises(TypeError, match="scope"):
        store.put("k", make_kv(1), torch.arange(T))
    with pytest.raises(TypeError, match="scope"):
        store.get("k")
    for bad in ("", "a/b", "..", "-lead", "sp ace", "x" * 65, "a:b", "a*", None, 3):
        with pytest.raises(ValueError, match="scope must be a scope name"):
            store.get("k", scope=bad)
    with pytest.raises(ValueError, match=r"scope\[1\] must be a scope name"):
        store.open_many(["k1", "k2"], scope=[A, "b/c"])
    with pytest.raises(ValueError, match="scope lists 1 scopes for 2 keys"):
        store.open_many(["k1", "k2"], scope=[A])
    with pytest.raises(ValueError, match="remote_scopes must be a sequence"):
        ChunkStore("m", "r", remote_scopes="public")
    assert check_scope(PUBLIC_SCOPE) == "public" and check_scope("Tenant_42-x") == "Tenant_42-x"


@pytest.fixture(scope="module")
def engine():
    return BlendEngine(tiny_llama())


CFG = BlendConfig(recompute_ratio=0.3)


def test_blender_keeps_tenants_apart_and_shares_only_public(engine, tmp_path):
    prefix, chunks, query = request_parts(3)
    ref = blend_encoded(engine, prefix, chunks, query, CFG)
    blender = CachedBlender(engine, disk_dir=tmp_path, cpu_bytes=1 << 20)
    with pytest.raises(TypeError, match="scope"):
        blender.blend(prefix, chunks, query, CFG)
    with pytest.raises(ValueError, match="scope lists 2 scopes for 3 chunks"):
        blender.blend(prefix, chunks, query, CFG, scope=[A, B])
    result, report = blender.blend(prefix, chunks, query, CFG, scope=A)
    assert report.tiers == {"encoded": 3} and torch.equal(result.logits, ref.logits)
    result, report = blender.blend(prefix, chunks, query, CFG, scope=A)
    assert report.tiers == {"cpu": 3} and torch.equal(result.logits, ref.logits)
    # tenant B sends the same passages: no hit on A's, B gets its own copies
    result, report = blender.blend(prefix, chunks, query, CFG, scope=B)
    assert report.tiers == {"encoded": 3} and torch.equal(result.logits, ref.logits)
    keys = [blender.key(c, prefix, CFG) for c in chunks]
    for s in (A, B):
        assert sorted(blender.store.keys("disk", scope=s)) == sorted(keys)
    # a shared corpus is shared because the caller says so: chunk 1 from "public"
    blender.add_many([chunks[1]], prefix, CFG, scope=PUBLIC_SCOPE)
    c = "tenant-c"
    result, report = blender.blend(prefix, chunks, query, CFG, scope=[c, PUBLIC_SCOPE, c])
    assert report.tiers == {"encoded": 2, "cpu": 1} and torch.equal(result.logits, ref.logits)
    assert blender.store.keys("disk", scope=PUBLIC_SCOPE) == [keys[1]]


def test_remote_scopes_keep_private_chunks_off_the_server(redis_url, tmp_path):
    store = ChunkStore("m", "r", cpu_bytes=0, disk_dir=tmp_path, remote=redis_url, remote_scopes=[PUBLIC_SCOPE])
    private = store.put("private", make_kv(1), torch.arange(T), scope=A)
    public = store.put("public", make_kv(2), torch.arange(T), scope=PUBLIC_SCOPE)
    assert store.keys("remote", scope=A) == [] and store.keys("remote", scope=PUBLIC_SCOPE) == [public]
    assert store.where(private, scope=A) == "disk"
    other_host = ChunkStore("m", "r", cpu_bytes=0, remote=redis_url)  # sees only what went to the server
    assert other_host.get(public, scope=PUBLIC_SCOPE) is not None
    assert other_host.get(private, scope=A) is None
