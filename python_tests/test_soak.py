"""A short soak: 60 random blends through CachedBlender with CPU and disk tiers that
evict all the time. Blends stay exact; open files, threads and store sizes stay flat; RSS
grows by less than what keeping each request's results alive would add (about 7 MiB
here). The 500-blend version with curves is ``python -m bench soak``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bench package

from bench.soak import load_engine, run_soak  # noqa: E402


def test_soak_stays_flat(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matrices are too small for threads
    try:
        with torch.inference_mode():
            result = run_soak(load_engine("tiny"), blends=60, sample_every=10, check_every=3, seed=1,
                              disk_dir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    s, budgets = result["summary"], result["budgets"]
    assert result["checks"] == 20 and result["mismatches"] == 0
    st = result["store_stats"]
    assert st["evictions"]["cpu"] > 0 and st["evictions"]["disk"] > 0  # both tiers really turned over
    assert st["hits"]["cpu"] > 0 and st["hits"]["disk"] > 0 and st["corrupt"] == 0
    assert s["open_fds"]["max"] <= s["open_fds"]["after_warmup"] + 1
    assert s["threads"]["max"] <= s["threads"]["after_warmup"]
    assert s["rss_mb"]["max"] - s["rss_mb"]["after_warmup"] <= 4.0, s["rss_mb"]
    assert s["cpu_bytes"]["max"] <= budgets["cpu"] and s["disk_bytes"]["max"] <= budgets["disk"]
