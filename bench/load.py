"""``python -m bench load``: loading stored chunk KV layer by layer behind the recompute.

A request of ``--chunks`` x ``--chunk-tokens`` reused tokens plus a query runs a
CacheBlend-shaped per-layer computation (its real cost, synthetic weights): per layer
the reused chunks' K/V are gathered into the request's KV buffer, ``ratio * N`` tokens
go through the QKV projection, attention over all ``N`` keys, the output projection and
the MLP. The chunks' KV comes from

* ``memory``: already on the compute device (the blend engine's default),
* ``ram``: the store's CPU tier (pinned when on a GPU),
* ``disk``: the store's files, read cold (dropped from the page cache before each run),
* ``redis``: the store's remote tier, nothing local (a private ``redis-server`` on
  127.0.0.1 started for the run, or ``--redis-url``),
* ``disk-mac``, ``redis-mac``: the same with a keyed MAC on every value, verified as each
  layer loads (a random key made for the run; see ``cacheblend_ext.store.integrity``),

each loaded with the layer-wise pipeline (``pipelined``) and, as the baseline, on demand
with a wait per layer (``sync``). Reported: time to first token (median), overhead vs
``memory``, the load time and the fraction of it hidden behind compute; the full
prefill of the same request (ratio 1, nothing reused) for reference; and the loading
controller's decisions on the numbers measured here.
"""

from __future__ import annotations

import math
import os
import secrets
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from bench import common
from cacheblend_ext.store.controller import LoadingController, Measurements, drop_page_cache
from cacheblend_ext.layer_source import MemoryLayerSource
from cacheblend_ext.store.pipeline import open_layer_source
from cacheblend_ext.store import ChunkStore

COMMAND = "load"
HELP = "TTFT with chunk KV loaded from CPU memory or disk, pipelined vs per-layer sync, vs KV in memory"

SHAPES = {
    # SmolLM2-135M (the bundled model) and Mistral-7B
    "smollm2": dict(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, inter=1536),
    "mistral7b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336),
}


def add_arguments(parser) -> None:
    parser.add_argument("--source", default="ram,disk",
                        help="where the chunk KV is loaded from: comma-separated ram, disk, redis, disk-mac, "
                             "redis-mac (default: ram,disk; 'both' = ram,disk, 'all' = ram,disk,redis)")
    parser.add_argument("--redis-url", default=None,
                        help="Redis for --source redis (redis://..., redis+cluster://...; default: a private "
                             "redis-server on 127.0.0.1 for the run)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape (default: smollm2 on CPU, mistral7b on GPU)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.15, help="recompute ratio")
    parser.add_argument("--depth", type=int, default=1, help="pipeline depth (layers loaded ahead)")
    parser.add_argument("--disk-dir", default=None, help="directory for the disk tier (default: a temp dir)")


class SyntheticModel:
    """One set of random layer weights reused by every layer (the cost of a real layer)."""

    def __init__(self, shape: dict, device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape
        self.s = s
        rnd = lambda *size: (torch.randn(*size, generator=g) / math.sqrt(size[0])).to(device=device, dtype=dtype)
        qkv = (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"]
        self.w_qkv = rnd(s["hidden"], qkv)
        self.w_o = rnd(s["heads"] * s["head_dim"], s["hidden"])
        self.w_gate_up = rnd(s["hidden"], 2 * s["inter"])
        self.w_down = rnd(s["inter"], s["hidden"])
        self.device, self.dtype = device, dtype

    def run(self, n: int, offsets: list, sel: torch.Tensor | None, source, kbuf, vbuf, hidden) -> torch.Tensor:
        """Layers 0..L-1 for the tokens ``sel`` (all when None) of an ``n``-token request."""
        s = self.s
        hq, hk, d = s["heads"], s["kv_heads"], s["head_dim"]
        x = hidden if sel is None else hidden[sel]
        for l in range(kbuf.shape[0]):
            if source is not None:
                for (start, end), kv in zip(offsets, source.layer(l)):
                    kbuf[l, start:end].copy_(kv[0])
                    vbuf[l, start:end].copy_(kv[1])
            qkv = x @ self.w_qkv
            q = qkv[:, : hq * d].view(-1, hq, d)
            k = qkv[:, hq * d: (hq + hk) * d].view(-1, hk, d)
            v = qkv[:, (hq + hk) * d:].view(-1, hk, d)
            if sel is None:
                kbuf[l].copy_(k)
                vbuf[l].copy_(v)
            else:
                kbuf[l].index_copy_(0, sel, k)
                vbuf[l].index_copy_(0, sel, v)
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kbuf[l].transpose(0, 1)[None],
                                               vbuf[l].transpose(0, 1)[None], is_causal=sel is None,
                                               enable_gqa=hq != hk)[0].transpose(0, 1)
            x = x + o.reshape(o.shape[0], -1) @ self.w_o
            gu = x @ self.w_gate_up
            x = x + (F.silu(gu[:, : s["inter"]]) * gu[:, s["inter"]:]) @ self.w_down
        return x[-1]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = common.resolve_dtype(args)
    gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    iters = args.iters if args.iters is not None else (10 if gpu else 3)
    shape = dict(SHAPES[args.shape or ("mistral7b" if gpu else "smollm2")])
    if args.layers:
        shape["layers"] = args.layers
    L, hk, d = shape["layers"], shape["kv_heads"], shape["head_dim"]
    sizes = [args.chunk_tokens] * args.chunks
    n = sum(sizes) + args.query_tokens
    offsets, start = [], 0
    for t in sizes:
        offsets.append((start, start + t))
        start += t
    m = max(1, math.ceil(args.ratio * n))
    g = torch.Generator(device="cpu").manual_seed(1)
    sel = torch.cat([torch.randperm(n - 1, generator=g)[: m - 1].sort().values, torch.tensor([n - 1])]).to(device)

    common.progress(f"{common.device_name(device)}: {args.chunks} x {args.chunk_tokens} + {args.query_tokens} tokens, "
                    f"{L} layers, {hk} KV heads x {d}, ratio {args.ratio}, {dtype}")
    model = SyntheticModel(shape, device, dtype)
    hidden = torch.randn(n, shape["hidden"], device=device, dtype=dtype)
    kbuf = torch.empty(L, n, hk, d, device=device, dtype=dtype)
    vbuf = torch.empty_like(kbuf)
    kvs_cpu = [torch.randn(L, 2, t, hk, d, generator=g).to(dtype) for t in sizes]
    kv_bytes = sum(kv.numel() * kv.element_size() for kv in kvs_cpu)
    kvs_dev = [kv.to(device) for kv in kvs_cpu]

    def once(make_source):
        _sync(device)
        t0 = time.perf_counter()
        source = make_source()  # opening the chunks (and starting the loader) is part of the request
        model.run(n, offsets, sel if source is not None else None, source, kbuf, vbuf, hidden)
        _sync(device)
        dt = (time.perf_counter() - t0) * 1e3
        report = None
        if source is not None:
            source.close()
            report = source.report()
        return dt, report

    # The full prefill is long on a CPU: fewer runs.
    full_times = [once(lambda: None)[0] for _ in range(max(1, min(iters, 2 if not gpu else iters)) + (1 if gpu else 0))]
    full_ms = statistics.median(full_times[1:] if gpu else full_times)
    common.progress(f"full prefill: {full_ms:.1f} ms")

    # Every other variant runs round-robin, so machine noise hits them alike.
    sources = parse_sources(args.source)
    tmp = tempfile.TemporaryDirectory(dir=args.disk_dir, prefix="cacheblend-bench-")
    redis = RedisForBench(args.redis_url) if any(TIER_OF_SOURCE[s] == "remote" for s in sources) else None
    variants = [("memory", None, lambda: None, lambda: MemoryLayerSource(kvs_dev))]
    for src in sources:
        store = bench_store(src, kv_bytes, tmp.name, redis)
        keys = [store.put(f"chunk{i}", kv, torch.arange(kv.shape[2]), scope=BENCH_SCOPE)
                for i, kv in enumerate(kvs_cpu)]

        def prepare(store=store, keys=keys, src=src):
            if TIER_OF_SOURCE[src] == "disk":  # cold reads: drop the files from the page cache (not timed)
                for k in keys:
                    drop_page_cache(store.chunk_path(k, scope=BENCH_SCOPE))

        def make(pipelined, store=store, keys=keys):
            source, missing = open_layer_source(store, keys, device, scope=BENCH_SCOPE, pipelined=pipelined,
                                                depth=args.depth)
            assert not missing
            return source

        for pipelined in (True, False):
            variants.append((src, pipelined, prepare, (lambda make=make, p=pipelined: make(p))))
    times = {i: [] for i in range(len(variants))}
    reports = {i: [] for i in range(len(variants))}
    try:
        for it in range(warmup + iters):
            for i, (_, _, prepare, make_source) in enumerate(variants):
                prepare()
                dt, rep = once(make_source)
                if it >= warmup:
                    times[i].append(dt)
                    if rep is not None:
                        reports[i].append(rep)
            common.progress(f"round {it + 1}/{warmup + iters}" + (" (warm-up)" if it < warmup else ""))
    finally:
        tmp.cleanup()
        if redis is not None:
            redis.close()

    mem_ms = statistics.median(times[0])
    rows = [["full prefill (nothing reused)", full_ms, 1.0, None, None, None, None],
            [f"CacheBlend r={args.ratio}, KV in memory", mem_ms, mem_ms / full_ms, 0.0, None, None, None]]
    results = {"memory": {"ttft_ms": mem_ms, "vs_full_prefill": mem_ms / full_ms, "times_ms": times[0]}}
    measured_gbps = {"gpu": math.inf}
    for i, (src, pipelined, _, _) in enumerate(variants):
        if pipelined is None:
            continue
        ms = statistics.median(times[i])
        load = statistics.median(r.load_ms for r in reports[i])
        exposed = statistics.median(r.exposed_ms for r in reports[i])
        hidden_frac = statistics.median(r.hidden_fraction for r in reports[i])
        label = f"CacheBlend r={args.ratio}, KV from {src}, {'pipelined' if pipelined else 'sync per layer'}"
        rows.append([label, ms, ms / full_ms, (ms - mem_ms) / mem_ms * 100, load, exposed,
                     hidden_frac if load > 0 else None])
        results[f"{src}_{'pipelined' if pipelined else 'sync'}"] = {
            "ttft_ms": ms, "vs_full_prefill": ms / full_ms, "overhead_vs_memory_pct": (ms - mem_ms) / mem_ms * 100,
            "load_ms": load, "exposed_ms": exposed, "hidden_fraction": hidden_frac, "times_ms": times[i],
            "reports": [r.as_dict() for r in reports[i]]}
        if not pipelined and not src.endswith("-mac"):
            tier = TIER_OF_SOURCE[src]
            measured_gbps[tier] = (kv_bytes / (load * 1e-3) / 1e9) if load > 0 else math.inf

    table = common.Table(f"TTFT, {common.device_name(device)}, {args.shape or ('mistral7b' if gpu else 'smollm2')} "
                         f"shape ({L} layers), {args.chunks} x {args.chunk_tokens} + {args.query_tokens} tokens",
                         ["variant", "TTFT ms", "x full", "+% vs memory", "load ms", "exposed ms", "hidden"])
    for r in rows:
        table.add(*[("-" if v is None else v) for v in r])
    print(table.render())

    # Controller on the numbers measured above.
    for tier in ("cpu", "disk", "remote"):
        measured_gbps.setdefault(tier, math.inf if tier == "cpu" and not gpu else None)
    gbps = {k: v for k, v in measured_gbps.items() if v is not None}
    # Recompute at ratio r costs r * prefill_layer(N): calibrate prefill_layer(N) from the
    # measured blend with the KV in memory (mem_ms / L at ratio args.ratio).
    meas = Measurements(prefill_a_ms=mem_ms / L / max(args.ratio, 1e-6) / n, kv_bytes_per_layer_token=2 * hk * d * kvs_cpu[0].element_size(),
                        tier_gbps=gbps, num_layers=L, device=str(device), dtype=str(dtype))
    ctl = LoadingController(meas, r_quality=args.ratio)
    decisions = {f"ratio_for_{t}": ctl.choose_ratio(n, t).as_dict() for t in gbps}
    decisions["tier_for_ratio"] = ctl.choose_tier(n, args.ratio).as_dict()
    ctable = common.Table("Loading controller on the measured numbers (per layer)",
                          ["decision", "tier", "ratio", "r_load", "recompute ms", "load ms", "hidden"])
    for name, dd in decisions.items():
        ctable.add(name, dd["tier"], dd["ratio"], dd["r_load"], dd["recompute_ms_per_layer"], dd["load_ms_per_layer"],
                   str(dd["hidden"]))
    print(ctable.render())
    for name, dd in decisions.items():
        print(f"  {name}: {dd['reason']}")

    return {"command": COMMAND, "env": common.environment(device), "shape": shape, "num_tokens": n,
            "ratio": args.ratio, "dtype": str(dtype), "kv_bytes": kv_bytes, "full_prefill_ms": full_ms,
            "memory_ms": mem_ms, "results": results, "table": table.as_dict(), "controller": decisions,
            "controller_table": ctable.as_dict()}


# ---------------------------------------------------------------------------
# Layer sources for ``python -m bench e2e --source ram|disk[-sync]``: the real blend
# engine reading its reused KV from the chunk store.
# ---------------------------------------------------------------------------


TIER_OF_SOURCE = {"ram": "cpu", "disk": "disk", "redis": "remote", "disk-mac": "disk", "redis-mac": "remote"}
BENCH_SCOPE = "bench"  # every benchmark chunk lives in this scope


def parse_sources(text: str) -> list[str]:
    """``--source`` of ``bench load``: a comma-separated subset of ``TIER_OF_SOURCE``."""
    text = {"both": "ram,disk", "all": "ram,disk,redis"}.get(text, text)
    sources = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in sources if s not in TIER_OF_SOURCE]
    if bad or not sources:
        raise SystemExit(f"--source must list {', '.join(TIER_OF_SOURCE)}, got {text!r}")
    return sources


class RedisForBench:
    """The Redis a benchmark loads from: ``url``, or a private server started for the run."""

    def __init__(self, url: str | None):
        self.server = None
        if url is None:
            from cacheblend_ext.testing.redis_server import RedisServer

            self.server = RedisServer().start()
            url = self.server.url
            common.progress(f"started a private redis-server at {url}")
        self.url = url
        self.namespace = f"cacheblend-bench-{os.getpid()}"
        self.stores = []

    def close(self) -> None:
        for store in self.stores:  # a shared server keeps nothing of the run
            store.clear(("remote",))
        if self.server is not None:
            self.server.stop()


def bench_store(source: str, kv_bytes: int, disk_dir: str | None, redis: RedisForBench | None) -> ChunkStore:
    """A store that serves every chunk from ``source`` (nothing in the tiers above it); the
    ``-mac`` sources with a keyed MAC under a random key made for the run (and a namespace
    or directory of their own)."""
    tier = TIER_OF_SOURCE[source]
    mac_key = secrets.token_bytes(32) if source.endswith("-mac") else None
    if tier == "remote":
        store = ChunkStore("bench", "bench", cpu_bytes=0, remote=redis.url, mac_key=mac_key,
                           remote_namespace=redis.namespace + ("-mac" if mac_key else ""))
        redis.stores.append(store)
        return store
    return ChunkStore("bench", "bench", disk_dir=os.path.join(disk_dir, source) if tier == "disk" else None,
                      cpu_bytes=0 if tier == "disk" else 2 * kv_bytes + (1 << 20), mac_key=mac_key)


class StoreSourceMaker:
    """Stores the request's chunks once, then makes a fresh layer source per blend and
    keeps the load reports (``summary()``)."""

    def __init__(self, engine, chunks, source: str, pipelined: bool, redis_url: str | None = None, depth: int = 1):
        self.source, self.pipelined, self.device = source, pipelined, engine.device
        tier = TIER_OF_SOURCE[source]
        self.tmp = tempfile.TemporaryDirectory(prefix="cacheblend-e2e-") if tier == "disk" else None
        self.redis = RedisForBench(redis_url) if tier == "remote" else None
        nbytes = sum(c.kv.numel() * c.kv.element_size() for c in chunks)
        self.store = bench_store(source, nbytes, self.tmp.name if self.tmp else None, self.redis)
        self.keys = [self.store.put(c.key, c.kv, c.positions, c.token_ids, scope=BENCH_SCOPE) for c in chunks]
        self.depth = depth
        self.sources = []

    def __call__(self):
        if TIER_OF_SOURCE[self.source] == "disk":  # cold reads (fsync + fadvise of clean pages: under a ms)
            for k in self.keys:
                drop_page_cache(self.store.chunk_path(k, scope=BENCH_SCOPE))
        source, missing = open_layer_source(self.store, self.keys, self.device, scope=BENCH_SCOPE,
                                            pipelined=self.pipelined, depth=self.depth)
        assert not missing
        self.sources.append(source)
        return source

    def summary(self) -> dict:
        reports = [s.report() for s in self.sources]
        self.sources = []
        if not reports:
            return {}
        return {"source": self.source, "pipelined": self.pipelined, "blends": len(reports),
                "load_ms": statistics.median(r.load_ms for r in reports),
                "exposed_ms": statistics.median(r.exposed_ms for r in reports),
                "hidden_fraction": statistics.median(r.hidden_fraction for r in reports)}

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
        if self.tmp is not None:
            self.tmp.cleanup()


def e2e_sources() -> dict:
    """``name -> factory(engine, chunks, args)`` entries for ``bench.e2e.SOURCES``."""
    out = {}
    for name in TIER_OF_SOURCE:
        for suffix, pipelined in (("", True), ("-sync", False)):
            out[name + suffix] = (lambda engine, chunks, args, name=name, pipelined=pipelined:
                                  StoreSourceMaker(engine, chunks, name, pipelined, getattr(args, "redis_url", None)))
    return out
