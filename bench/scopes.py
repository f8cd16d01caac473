"""``python -m bench scopes``: what a tenant can learn by timing a chunk lookup.

Tenant A stores a chunk; the store then answers three lookups, round-robin so machine
noise hits them alike: A's own chunk from scope A (a hit), A's chunk from scope B (what
an attacker in scope B would time), and a chunk nobody stored, from scope B (a plain
miss), in a random order every round. Per tier (``cpu``, ``disk``, ``redis``) the store
holds the chunk only there, and a lookup is ``ChunkStore.open`` (what a request does
first: memory lookup, or the file's or value's header, positions and token ids) followed
by closing the handle. Reported: median microseconds of each, and per-round ratios
against the plain miss: a hit stands out (that is the timing channel scopes close);
another scope's chunk should not.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time

import torch

from bench import common
from bench.e2e import bootstrap_median_ci
from bench.load import RedisForBench
from cacheblend_ext.store import ChunkStore

COMMAND = "scopes"
HELP = "lookup time of an own chunk, another scope's chunk and a chunk nobody stored, per tier"
TIERS = ("cpu", "disk", "redis")


def add_arguments(parser) -> None:
    parser.add_argument("--tiers", default=",".join(TIERS), help=f"comma-separated subset of {', '.join(TIERS)}")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the chunk (SmolLM2-135M shape, fp32)")
    parser.add_argument("--redis-url", default=None, help="Redis to use (default: a private redis-server)")


def _store(tier: str, tmp: str, redis: RedisForBench | None) -> ChunkStore:
    if tier == "cpu":
        return ChunkStore("bench", "bench", cpu_bytes=1 << 30)
    if tier == "disk":
        return ChunkStore("bench", "bench", cpu_bytes=0, disk_dir=tmp)
    store = ChunkStore("bench", "bench", cpu_bytes=0, remote=redis.url, remote_namespace=redis.namespace)
    redis.stores.append(store)
    return store


def _lookup(store: ChunkStore, key: str, scope: str) -> float:
    t0 = time.perf_counter()
    handle = store.open(key, scope=scope)
    if handle is not None:
        handle.close()
    return (time.perf_counter() - t0) * 1e6


def run(args) -> dict:
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if not tiers or any(t not in TIERS for t in tiers):
        raise SystemExit(f"--tiers must list {', '.join(TIERS)}, got {args.tiers!r}")
    warmup = args.warmup if args.warmup is not None else 20
    iters = args.iters if args.iters is not None else 3000
    kv = torch.randn(30, 2, args.tokens, 3, 64)  # SmolLM2-135M: 30 layers, 3 KV heads x 64
    redis = RedisForBench(args.redis_url) if "redis" in tiers else None
    lookups = {"own chunk (hit)": ("tenant-a", "secret-doc"), "another scope's chunk": ("tenant-b", "secret-doc"),
               "chunk nobody stored": ("tenant-b", "absent-doc")}  # a key of the same length
    table = common.Table(f"Chunk lookup (open + close) on {common.device_name('cpu')}, a {args.tokens}-token chunk, "
                         f"{iters} rounds", ["tier", "lookup", "median us", "x nobody's (paired median)",
                                             "95% interval", "found"])
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="cacheblend-scopes-") as tmp:
            for tier in tiers:
                store = _store(tier, tmp, redis)
                store.put("secret-doc", kv, torch.arange(args.tokens), token_ids=torch.arange(args.tokens),
                          scope="tenant-a")
                found = {name: store.open(key, scope=s) is not None for name, (s, key) in lookups.items()}
                samples = {name: [] for name in lookups}
                # A lookup right after a hit measured up to 25% slower (runs with a fixed cyclic
                # order), so which lookup follows which must not favour any: a random order
                # per round gives every lookup the same predecessors in expectation.
                rng = random.Random(0)
                names = list(lookups)
                for it in range(warmup + iters):
                    rng.shuffle(names)
                    for name in names:
                        scope, key = lookups[name]
                        us = _lookup(store, key, scope)
                        if it >= warmup:
                            samples[name].append(us)
                base = samples["chunk nobody stored"]
                results[tier] = {}
                for name, xs in samples.items():
                    ratios = [a / b for a, b in zip(xs, base)]
                    paired, ci = statistics.median(ratios), bootstrap_median_ci(ratios)
                    results[tier][name] = {"median_us": statistics.median(xs), "min_us": min(xs),
                                           "paired_ratio_vs_nobody": paired, "ci95": ci, "found": found[name],
                                           "samples_us": xs}
                    table.add(tier, name, statistics.median(xs), paired, f"{ci[0]:.3f} to {ci[1]:.3f}",
                              str(found[name]))
                store.clear(("cpu", "disk"))
                common.progress(f"{tier}: done")
    finally:
        if redis is not None:
            redis.close()
    print(table.render())
    return {"command": COMMAND, "environment": common.environment("cpu"), "tokens": args.tokens, "warmup": warmup,
            "iters": iters, "table": table.as_dict(), "results": results}
