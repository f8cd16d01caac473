"""Disk tier faults: temporary files of writers killed mid-write, temporary files in the
budget, and several processes writing into one directory under one budget."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import torch

from cacheblend_ext.store import disk
from cacheblend_ext.store import ChunkStore

L, T, H, D = 4, 512, 2, 16  # 128 KiB of fp32 KV per chunk
S = "tenant-1"  # the scope of every chunk here


def make_kv(seed=0, layers=L):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, T, H, D, generator=g)


def chunk_size(tmp_path, layers=L) -> int:
    """Bytes of one stored chunk of ``layers`` layers."""
    store = ChunkStore("m", "r", disk_dir=tmp_path / f"probe{layers}", cpu_bytes=0)
    key = store.put("probe", make_kv(layers=layers), torch.arange(T), scope=S)
    return os.path.getsize(store.chunk_path(key, scope=S))


def tmp_files(root):
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(".tmp")]


def dir_bytes(root) -> int:
    total = 0
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith((".tmp", ".cbkv")):
                try:
                    total += os.path.getsize(os.path.join(d, n))
                except OSError:
                    pass  # removed while we looked
    return total


# ---------------------------------------------------------------------------
# a writer killed with SIGKILL in the middle of a write
# ---------------------------------------------------------------------------


def _writer_that_stalls(root, budget, ready):
    """Writes one 64-layer chunk but stops for good after its first layer (then gets killed)."""
    original = disk.write_all
    calls = []

    def stalling(f, data):
        original(f, data)
        calls.append(1)
        if len(calls) == 2:  # header and layer 0 are in the temporary file
            ready.set()
            time.sleep(600)

    disk.write_all = stalling
    store = ChunkStore("m", "r", disk_dir=root, cpu_bytes=0, disk_bytes=budget, pin_memory=False)
    store.put("victim", make_kv(layers=64), torch.arange(T), scope=S)


def test_temp_file_of_a_killed_writer_is_removed(tmp_path):
    root = tmp_path / "kv"
    size, big = chunk_size(tmp_path), chunk_size(tmp_path, layers=64)
    budget = big + 7 * size + size // 2  # the 8th small chunk only fits once the victim is gone
    before = ChunkStore("m", "r", disk_dir=root, cpu_bytes=0, disk_bytes=budget)  # opened before the kill
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_writer_that_stalls, args=(str(root), budget, ready))
    child.start()
    try:
        assert ready.wait(120), "the writer never started writing"
        (tmp,) = tmp_files(root)
        assert f".{child.pid}." in os.path.basename(tmp)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == -signal.SIGKILL
    # preallocated: the partial file has its full size and counts in full
    assert os.path.getsize(tmp) == big
    assert before.stats()["bytes"]["disk"] == big
    # 1. when the budget fills up, the rescan removes the dead writer's file and reclaims
    #    its room instead of evicting live chunks
    for i in range(8):
        before.put(f"c{i}", make_kv(seed=i), torch.arange(T), scope=S)
    assert tmp_files(root) == []
    assert len(before.keys("disk", scope=S)) == 8 and before.stats()["evictions"]["disk"] == 0
    assert dir_bytes(root) <= budget
    # 2. opening a store removes one too (a file named after the same, now dead, writer)
    with open(tmp, "wb") as f:
        f.write(b"partial")
    ChunkStore("m", "r", disk_dir=root)
    assert tmp_files(root) == []


def test_temp_files_of_live_writers_are_kept_and_counted(tmp_path):
    size = chunk_size(tmp_path)
    root = tmp_path / "kv"
    (root / "ab").mkdir(parents=True)
    name = disk.tmp_name("ab" + "0" * 38)
    live = root / "ab" / name  # this process: alive
    live.write_bytes(b"\0" * size)
    other_host = root / "ab" / name.replace(disk.HOST, "elsewhere")  # another host, recent
    other_host.write_bytes(b"x")
    old_other_host = root / "ab" / ".k.elsewhere.1.2.deadbeef.tmp"
    old_other_host.write_bytes(b"x")
    os.utime(old_other_host, (1, 1))
    reused_pid = root / "ab" / name.replace(".tmp", "0.tmp")  # our pid, but written before we started
    reused_pid.write_bytes(b"x")
    os.utime(reused_pid, (1000, 1000))
    store = ChunkStore("m", "r", disk_dir=root, cpu_bytes=0, disk_bytes=3 * size + size // 2)
    assert live.exists() and other_host.exists()
    assert not old_other_host.exists() and not reused_pid.exists()
    for i in range(4):
        store.put(f"c{i}", make_kv(seed=i), torch.arange(T), scope=S)
    # the live temporary file takes one chunk's room: two chunk files fit, not three
    assert len(store.keys("disk", scope=S)) == 2 and live.exists()
    assert dir_bytes(root) <= 3 * size + size // 2
    assert store.stats()["bytes"]["disk"] == dir_bytes(root)


def test_writer_alive_checks():
    assert disk.writer_alive(os.getpid(), time.time())
    assert not disk.writer_alive(os.getpid(), 1000.0)  # a process started after the write is not the writer
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    assert not disk.writer_alive(p.pid, time.time())


# ---------------------------------------------------------------------------
# several processes, one directory, one budget
# ---------------------------------------------------------------------------


def _budget_writer(root, budget, barrier, index, count):
    store = ChunkStore("m", "r", disk_dir=root, cpu_bytes=0, disk_bytes=budget, pin_memory=False)
    kvs = [make_kv(seed=100 * index + i) for i in range(count)]
    barrier.wait()
    for i, kv in enumerate(kvs):
        store.put(f"p{index}c{i}", kv, torch.arange(T), scope=S)
        time.sleep(0.01)  # let the writers interleave


def test_processes_sharing_a_directory_stay_under_the_budget(tmp_path):
    size = chunk_size(tmp_path)
    root = tmp_path / "kv"
    budget = 6 * size
    ChunkStore("m", "r", disk_dir=root, disk_bytes=budget)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_budget_writer, args=(str(root), budget, barrier, i, 20)) for i in range(2)]
    for p in procs:
        p.start()
    peak, stop = [0], threading.Event()

    def monitor():  # snapshots under the writers' lock: eviction and new files are atomic to it
        import fcntl

        while not stop.is_set():
            fd = os.open(root / disk.USAGE_FILE, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                peak[0] = max(peak[0], dir_bytes(root))
            finally:
                os.close(fd)

    watcher = threading.Thread(target=monitor)
    barrier.wait()
    watcher.start()
    for p in procs:
        p.join(120)
    stop.set()
    watcher.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert dir_bytes(root) <= budget
    # without shared accounting each writer overshoots by its own writes (up to 2x)
    assert peak[0] <= budget, (peak[0], budget)
    keys = ChunkStore("m", "r", disk_dir=root, disk_bytes=budget).keys("disk", scope=S)
    assert 4 <= len(keys) <= 6
