"""The keyed MAC: values written with the key round-trip in the disk and Redis tiers; a
forged value (no MAC, another key, a tampered header with valid crcs, a tampered layer)
is refused, counted in ``stats()["bad_mac"]`` and deleted, at open or while the layers
stream; CachedBlender recomputes and never uses forged KV."""

from __future__ import annotations

import json
import os
import zlib

import pytest
import torch

from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.cached import CachedBlender
from cacheblend_ext.store import ChunkCorruptError, ChunkMac, ChunkStore, mac_key_from_env
from cacheblend_ext.store.chunk_format import PREFIX
from cacheblend_ext.store.pipeline import StoreLayerSource, open_layer_source
from helpers import request_parts, tiny_llama

L, T, H, D = 5, 7, 2, 8
S = "tenant-1"
KEY = bytes(range(32))  # a test key; deployments read theirs from their configuration


def make_kv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, T, H, D, generator=g) + 0.5


def store_for(tier, where, mac_key=KEY, **kw):
    if tier == "disk":
        return ChunkStore("m", "r", cpu_bytes=0, disk_dir=where, mac_key=mac_key, **kw)
    return ChunkStore("m", "r", cpu_bytes=0, remote=where, mac_key=mac_key, **kw)


@pytest.fixture(params=["disk", "remote"])
def tier(request, tmp_path):
    """``(tier, where)``: a disk directory or a Redis URL, and raw access to the value."""
    if request.param == "disk":
        return "disk", tmp_path / "kv"
    return "remote", request.getfixturevalue("redis_url")


def read_value(store, key):
    if store.disk_dir is not None:
        return open(store.chunk_path(key, scope=S), "rb").read()
    return store.remote.client.get(store.remote.redis_key(S, key))


def write_value(store, key, value):
    if store.disk_dir is not None:
        path = store.chunk_path(key, scope=S)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(value)
    else:
        store.remote.client.set(store.remote.redis_key(S, key), value)


def value_exists(store, key):
    if store.disk_dir is not None:
        return os.path.exists(store.chunk_path(key, scope=S))
    return bool(store.remote.client.exists(store.remote.redis_key(S, key)))


def split(value):
    """``(prefix fields, header dict, header end)`` of a stored value."""
    fields = PREFIX.unpack_from(value)
    end = PREFIX.size + fields[2]
    return fields, json.loads(value[PREFIX.size:end]), end


def rebuild(value, header, tag=None):
    """``value`` with ``header`` (same length or not) and a correct header crc: what a
    forger without the key can write. The header MAC stays (or becomes ``tag``)."""
    fields, _, end = split(value)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    data_offset = (end + 63) // 64 * 64
    new_prefix_len = PREFIX.size + len(hbytes)
    new_offset = (new_prefix_len + 63) // 64 * 64
    head = PREFIX.pack(fields[0], fields[1], len(hbytes), zlib.crc32(hbytes), fields[4] if tag is None else tag)
    return head + hbytes + b"\0" * (new_offset - new_prefix_len) + value[data_offset:]


def test_mac_round_trip_and_readers_without_the_key(tier):
    kind, where = tier
    store = store_for(kind, where)
    kv = make_kv()
    key = store.put("k", kv, torch.arange(T), token_ids=torch.arange(T) + 5, meta={"a": 1}, scope=S)
    _, header, _ = split(read_value(store, key))
    assert header["mac"]["alg"] == "hmac-sha256" and len(header["mac"]["layers"]) == L
    got = store.get(key, scope=S)
    assert torch.equal(got.kv, kv) and torch.equal(got.token_ids, torch.arange(T) + 5) and got.meta == {"a": 1}
    source, missing = open_layer_source(store, [key], "cpu", scope=S)
    assert not missing and all(torch.equal(source.layer(l)[0], kv[l]) for l in range(L))
    source.close()
    # a reader without the key still checks the crcs and reads the value
    plain = store_for(kind, where, mac_key=None)
    assert torch.equal(plain.get(key, scope=S).kv, kv)
    assert store.stats()["bad_mac"] == 0 and plain.stats()["corrupt"] == 0


def _forge_without_key(kind, where, key):
    store_for(kind, where, mac_key=None).put(key, make_kv(9), torch.arange(T), scope=S)


def _forge_with_another_key(kind, where, key):
    store_for(kind, where, mac_key=bytes(reversed(range(32)))).put(key, make_kv(9), torch.arange(T), scope=S)


def _forge_layer_with_valid_crcs(kind, where, key):
    """Replace layer 2 of a genuine value with other KV and fix its crc in the header (and
    the header crc): every crc is right, the header MAC no longer is."""
    genuine = store_for(kind, where)
    genuine.put(key, make_kv(), torch.arange(T), scope=S)
    value = bytearray(read_value(genuine, key))
    _, header, end = split(bytes(value))
    offset = (end + 63) // 64 * 64 + 2 * header["layer_nbytes"]
    forged_layer = make_kv(9)[2].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    value[offset:offset + len(forged_layer)] = forged_layer
    header["layer_crc"][2] = zlib.crc32(forged_layer)
    write_value(genuine, key, rebuild(bytes(value), header))


def _forge_header_meta(kind, where, key):
    """A genuine value whose header meta (the prefix the chunk was encoded after) was
    changed, its crc fixed: every layer and the tail still match their tags, only the
    header MAC catches it."""
    genuine = store_for(kind, where)
    genuine.put(key, make_kv(), torch.arange(T), meta={"prefix_ids": [1, 7, 9]}, scope=S)
    value = read_value(genuine, key)
    _, header, _ = split(value)
    header["meta"] = {"prefix_ids": [1, 7, 8]}
    write_value(genuine, key, rebuild(value, header))


def _forge_token_ids(kind, where, key):
    """A genuine value whose last token id was changed (the header untouched): only the
    MAC of the positions and token ids catches it."""
    genuine = store_for(kind, where)
    genuine.put(key, make_kv(), torch.arange(T), token_ids=torch.arange(T) + 3, scope=S)
    value = bytearray(read_value(genuine, key))
    value[-8:] = (99).to_bytes(8, "little")
    write_value(genuine, key, bytes(value))


def _forge_header_without_tag(kind, where, key):
    """A genuine value whose header claims no MAC (the tags removed, the tag field zeroed)."""
    genuine = store_for(kind, where)
    genuine.put(key, make_kv(), torch.arange(T), scope=S)
    value = read_value(genuine, key)
    _, header, _ = split(value)
    header["mac"] = None
    write_value(genuine, key, rebuild(value, header, tag=bytes(32)))


@pytest.mark.parametrize("forge", [_forge_without_key, _forge_with_another_key, _forge_layer_with_valid_crcs,
                                   _forge_header_meta, _forge_token_ids, _forge_header_without_tag],
                         ids=["no-mac", "other-key", "layer-with-valid-crcs", "header-meta", "token-ids",
                              "mac-stripped"])
def test_forged_value_is_refused_counted_and_deleted(tier, forge):
    kind, where = tier
    forge(kind, where, "k")
    store = store_for(kind, where)
    assert value_exists(store, "k")
    assert store.get("k", scope=S) is None and store.open("k", scope=S) is None
    st = store.stats()
    assert st["bad_mac"] == 1 and st["corrupt"] == 1 and st["misses"] == 2  # the second lookup: gone
    assert not value_exists(store, "k")  # deleted (compare-and-delete / same file)
    assert store.stats()["hits"] == {"gpu": 0, "cpu": 0, "disk": 0, "remote": 0}


def test_tampered_layer_is_refused_while_streaming(tier):
    """The header is genuine (its MAC verifies when the chunk is opened); layer 3 was
    changed afterwards: the loader refuses it when it arrives, before the engine sees it."""
    kind, where = tier
    store = store_for(kind, where)
    key = store.put("k", make_kv(), torch.arange(T), scope=S)
    handle = store.open(key, scope=S)
    value = bytearray(read_value(store, key))
    offset = handle.reader.header.layer_offset(3) + 5
    value[offset] ^= 0x20
    if kind == "remote":
        write_value(store, key, bytes(value))
    else:
        _patch_file(store, key, offset, value[offset])
    source = StoreLayerSource([handle], "cpu", pipelined=True)
    with pytest.raises(ChunkCorruptError, match="layer 3 MAC mismatch"):
        for l in range(L):
            source.layer(l)
    source.close()
    assert store.stats()["bad_mac"] == 1 and not value_exists(store, key)


def _patch_file(store, key, offset, byte):
    """Change one byte of the open file in place (the reader keeps reading the same inode)."""
    with open(store.chunk_path(key, scope=S), "r+b") as f:
        f.seek(offset)
        f.write(bytes([byte]))


def test_blender_recomputes_instead_of_using_forged_kv(tmp_path):
    engine = BlendEngine(tiny_llama())
    cfg = BlendConfig(recompute_ratio=0.3)
    prefix, chunks, query = request_parts(5)
    context = engine.chunk_context(prefix, cfg)
    ref = engine.blend([prefix] + [engine.encode_chunk(c, context) for c in chunks] + [query], cfg)
    forger = CachedBlender(engine, disk_dir=tmp_path, cpu_bytes=0)  # no key: writes plausible values
    keys = forger.add_many(chunks, prefix, cfg, scope=S)
    for k in keys:  # plant other KV (the chunk's own tokens, KV of other text) under the real keys
        got = forger.store.get(k, scope=S)
        forger.store.remove(k, scope=S)
        forger.store.put(k, torch.flip(got.kv, dims=[2]), got.positions, got.token_ids, got.meta, scope=S)
    blender = CachedBlender(engine, disk_dir=tmp_path, cpu_bytes=0, mac_key=KEY)
    result, report = blender.blend(prefix, chunks, query, cfg, scope=S)
    assert report.tiers == {"encoded": 3} and torch.equal(result.logits, ref.logits)
    assert blender.store.stats()["bad_mac"] == 3
    result, report = blender.blend(prefix, chunks, query, cfg, scope=S)  # now its own MAC'd values
    assert report.tiers == {"disk": 3} and torch.equal(result.logits, ref.logits)


def test_blake2b_and_mixed_algorithms(tmp_path):
    store = ChunkStore("m", "r", cpu_bytes=0, disk_dir=tmp_path, mac_key=KEY, mac_algorithm="blake2b")
    key = store.put("k", make_kv(), torch.arange(T), scope=S)
    assert torch.equal(store.get(key, scope=S).kv, make_kv())
    hmac_reader = ChunkStore("m", "r", cpu_bytes=0, disk_dir=tmp_path, mac_key=KEY)  # same key, other MAC
    assert hmac_reader.get(key, scope=S) is None and hmac_reader.stats()["bad_mac"] == 1


def test_mac_arguments_and_key_from_environment(monkeypatch):
    with pytest.raises(ValueError, match="mac_key must be at least 16 bytes"):
        ChunkStore("m", "r", mac_key=b"short")
    with pytest.raises(TypeError, match="mac_key must be bytes"):
        ChunkStore("m", "r", mac_key="0123456789abcdef0123456789abcdef")
    with pytest.raises(ValueError, match="mac_algorithm must be one of"):
        ChunkStore("m", "r", mac_key=KEY, mac_algorithm="md5")
    with pytest.raises(ValueError, match="at most 64 bytes"):
        ChunkMac(bytes(65), "blake2b")
    with pytest.raises(ValueError, match="mac_key configures the store"):
        CachedBlender(BlendEngine(tiny_llama()), ChunkStore("m", "r"), mac_key=KEY)
    monkeypatch.delenv("CACHEBLEND_MAC_KEY", raising=False)
    assert mac_key_from_env() is None
    with pytest.raises(ValueError, match="CACHEBLEND_MAC_KEY is not set"):
        mac_key_from_env(required=True)
    monkeypatch.setenv("CACHEBLEND_MAC_KEY", "zz" * 16)
    with pytest.raises(ValueError, match="hex digits"):
        mac_key_from_env()
    monkeypatch.setenv("CACHEBLEND_MAC_KEY", "ab" * 8)
    with pytest.raises(ValueError, match="holds 8 bytes"):
        mac_key_from_env()
    monkeypatch.setenv("CACHEBLEND_MAC_KEY", KEY.hex())
    assert mac_key_from_env() == KEY
    assert ChunkMac(KEY).key_id == ChunkMac(KEY).key_id != ChunkMac(bytes(32)).key_id
    assert KEY.hex() not in repr(ChunkMac(KEY))
