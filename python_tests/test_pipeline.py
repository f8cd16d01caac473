"""Layer-wise (pipelined) loading of stored chunk KV."""

from __future__ import annotations

import os

import pytest
import torch

from cacheblend_ext.layer_source import MemoryLayerSource
from cacheblend_ext.store.pipeline import StoreLayerSource, open_layer_source
from cacheblend_ext.store import FILE_SUFFIX, ChunkCorruptError, ChunkStore
from helpers import DEVICES, DTYPES

L, H, D = 5, 2, 8
S = "tenant-1"  # the scope of every chunk here
TOKENS = [7, 3, 11]


def make_kv(tokens, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, 2, tokens, H, D, generator=g) + 0.25).to(dtype)


def fill(store, dtype=torch.float32, tiers=None):
    """Put the test chunks; ``tiers[i]`` in {"cpu", "disk"} drops chunk i from memory if "disk"."""
    keys = []
    for i, t in enumerate(TOKENS):
        keys.append(store.put(f"chunk{i}", make_kv(t, i, dtype), torch.arange(t) + 50 * i, scope=S))
    if tiers:
        for k, tier in zip(keys, tiers):
            if tier == "disk":
                store.remove(k, tiers=("cpu",), scope=S)
    return keys


def fake_compute(device, work=2):
    """A little work on the current stream between layers (stands in for recompute)."""
    x = torch.randn(64, 64, device=device)
    for _ in range(work):
        x = x @ x / 64
    return x


def consume(source, device, order=None):
    """Read every layer like the engine does and return copies of what it saw."""
    seen = []
    for l in range(source.num_layers):
        layer = source.layer(l)
        fake_compute(device)
        seen.append([t.clone() for t in layer])
    return seen


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "sync"])
@pytest.mark.parametrize("tiers", [("cpu", "cpu", "cpu"), ("disk", "disk", "disk"), ("disk", "cpu", "disk")],
                         ids=["cpu", "disk", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_layers_match_stored_kv(tmp_path, device, dtype, tiers, pipelined):
    store = ChunkStore("m", "r", disk_dir=tmp_path)
    keys = fill(store, dtype, tiers)
    source, missing = open_layer_source(store, keys, device, pipelined=pipelined, scope=S)
    assert missing == []
    assert [h.tier for h in source.handles] == list(tiers)
    with source:
        seen = consume(source, device)
        report = source.report()
    for l in range(L):
        for i, t in enumerate(TOKENS):
            assert seen[l][i].device.type == device and seen[l][i].shape == (2, t, H, D)
            assert torch.equal(seen[l][i].cpu(), make_kv(t, i, dtype)[l])
    for i, t in enumerate(TOKENS):
        assert torch.equal(source.positions[i], torch.arange(t) + 50 * i)
    assert report.mode == ("pipelined" if pipelined else "sync")
    assert report.num_layers == L and report.num_chunks == 3
    assert len(report.load_ms_per_layer) == L and len(report.exposed_ms_per_layer) == L
    assert 0.0 <= report.hidden_fraction <= 1.0
    assert report.hidden_ms == pytest.approx(max(0.0, report.load_ms - report.exposed_ms), abs=1e-6)
    if not pipelined:
        assert report.hidden_ms == pytest.approx(0.0, abs=1e-6)
    loads_anything = device == "cuda" or "disk" in tiers
    assert (report.bytes_loaded > 0) == loads_anything
    if "disk" in tiers:
        assert report.load_ms > 0


@pytest.mark.parametrize("tiers", [("cpu", "cpu", "cpu"), ("disk", "cpu", "disk")], ids=["cpu", "mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_pipelined_under_inference_mode(tmp_path, device, tiers):
    """Opened and consumed under torch.inference_mode, as bench e2e and serving code do: the
    loader thread (GPU staging copies, disk reads) runs in the consumer's mode, since a copy
    into an inference tensor outside inference mode raises (seen on an H200)."""
    store = ChunkStore("m", "r", disk_dir=tmp_path)
    keys = fill(store, tiers=tiers)
    with torch.inference_mode():
        source, _ = open_layer_source(store, keys, device, pipelined=True, scope=S)
        with source:
            seen = consume(source, device)
    for l in range(L):
        assert all(torch.equal(seen[l][i].cpu(), make_kv(t, i)[l]) for i, t in enumerate(TOKENS))


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("device", DEVICES)
def test_depths_and_promotion(tmp_path, device, depth):
    store = ChunkStore("m", "r", disk_dir=tmp_path)
    keys = fill(store, tiers=("disk",) * 3)
    source, _ = open_layer_source(store, keys, device, depth=depth, scope=S)
    with source:
        seen = consume(source, device)
    for l in range(L):
        assert all(torch.equal(seen[l][i].cpu(), make_kv(t, i)[l]) for i, t in enumerate(TOKENS))
    # fully loaded disk chunks were promoted into the CPU tier
    assert [store.where(k, scope=S) for k in keys] == ["cpu"] * 3


@pytest.mark.parametrize("device", DEVICES)
def test_disk_same_as_memory_for_a_layerwise_consumer(tmp_path, device):
    """A blend-like consumer (per-layer attention of a query over the chunks' KV) gives
    bit-identical results whether the KV comes from memory or from disk."""
    kvs = [make_kv(t, i).to(device) for i, t in enumerate(TOKENS)]

    def run(source):
        q = torch.randn(4, H, D, generator=torch.Generator().manual_seed(9)).to(device)
        outs = []
        for l in range(L):
            layer = source.layer(l)
            k = torch.cat([x[0] for x in layer])  # [N, H, D]
            v = torch.cat([x[1] for x in layer])
            att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / D ** 0.5, dim=-1)
            q = q + torch.einsum("hqk,khd->qhd", att, v)
            outs.append(q.clone())
        return torch.stack(outs)

    ref = run(MemoryLayerSource(kvs))
    store = ChunkStore("m", "r", disk_dir=tmp_path, cpu_bytes=0)
    keys = fill(store)
    source, _ = open_layer_source(ChunkStore("m", "r", disk_dir=tmp_path), keys, device, scope=S)
    with source:
        got = run(source)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "sync"])
@pytest.mark.parametrize("device", DEVICES)
def test_corrupt_layer_raises_chunk_corrupt_and_removes_file(tmp_path, device, pipelined):
    writer = ChunkStore("m", "r", disk_dir=tmp_path, cpu_bytes=0)
    keys = fill(writer)
    store = ChunkStore("m", "r", disk_dir=tmp_path)
    path = str(store.chunk_path(keys[1], scope=S))
    with open(path, "rb") as f:
        data = bytearray(f.read())
    layer_bytes = 2 * TOKENS[1] * H * D * 4
    tail = 8 * TOKENS[1]
    pos = len(data) - tail - 2 * layer_bytes + 5  # inside layer L-2
    data[pos] ^= 0x40
    with open(path, "wb") as f:
        f.write(data)
    source, missing = open_layer_source(store, keys, device, pipelined=pipelined, scope=S)
    assert missing == []
    with source:
        for l in range(L - 2):
            source.layer(l)
        with pytest.raises(ChunkCorruptError) as info:
            source.layer(L - 2)
        assert info.value.key == keys[1]
    assert not os.path.exists(path)
    # the next request sees the chunk as missing
    source, missing = open_layer_source(store, keys, device, scope=S)
    source.close()
    assert missing == [1]


@pytest.mark.parametrize("device", DEVICES)
def test_close_early_does_not_hang(tmp_path, device):
    store = ChunkStore("m", "r", disk_dir=tmp_path, cpu_bytes=0)
    keys = fill(store)
    source, _ = open_layer_source(store, keys, device, scope=S)
    source.layer(0)
    source.close()
    assert source.report().num_layers == L


def test_missing_chunks_are_reported(tmp_path):
    store = ChunkStore("m", "r", disk_dir=tmp_path)
    keys = fill(store)
    source, missing = open_layer_source(store, [keys[2], "absent", keys[0]], "cpu", scope=S)
    with source:
        assert missing == [1] and source.keys == [keys[2], keys[0]]
        assert torch.equal(source.layer(3)[1], make_kv(TOKENS[0], 0)[3])
    with pytest.raises(ValueError, match="every handle must be open"):
        StoreLayerSource([None], "cpu")


def test_layer_index_checked(tmp_path):
    store = ChunkStore("m", "r")
    keys = fill(store)
    source, _ = open_layer_source(store, keys, "cpu", scope=S)
    with source, pytest.raises(IndexError, match="out of range"):
        source.layer(L)
