"""``python -m bench soak``: many blends of random requests through ``CachedBlender`` with
small CPU and disk budgets (both tiers evict all the time): resident memory, open files,
threads and store sizes must stay flat, and the blends must stay exact.

Each request is a fixed prefix, 2 to 5 chunks drawn at random (any order) from a pool of
random-length chunks, and a random query. Every ``--check-every`` blends the result is
compared with the engine's in-memory blend of freshly encoded chunks (logits must be
equal). Every ``--sample-every`` blends the process is measured after ``gc.collect()``
and ``malloc_trim(0)`` (freed heap returned to the system, so RSS tracks live memory):
RSS, entries in ``/proc/self/fd``, threads (``/proc/self/status``, native ones
included), and the store's CPU-tier and disk bytes.

Writes ``soak.json`` (every sample, the summary) and ``soak.png`` (the curves) to
``--out`` (``soak_redis.*`` with ``--redis``). The summary fits a line to each curve after
the warm-up (the first fifth) and reports its growth per 100 blends.
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench import common

COMMAND = "soak"
HELP = "many random blends through CachedBlender (RAM + disk tiers): memory, files and store sizes stay flat"
SOAK_SCOPE = "soak"  # every chunk of the soak lives in this scope


def add_arguments(parser) -> None:
    parser.add_argument("--blends", type=int, default=500)
    parser.add_argument("--model", default="tiny", help="tiny (random 4-layer Llama) or smollm2-135m-instruct")
    parser.add_argument("--pool", type=int, default=48, help="distinct chunks requests draw from")
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cpu-fraction", type=float, default=0.25, help="CPU budget as a fraction of the pool's KV")
    parser.add_argument("--disk-fraction", type=float, default=0.5, help="disk budget as a fraction of the pool's KV")
    parser.add_argument("--sample-every", type=int, default=10)
    parser.add_argument("--check-every", type=int, default=10, help="compare with an in-memory blend (0: never)")
    parser.add_argument("--redis", action="store_true", help="add a private redis-server as the remote tier")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 for the tiny model, whose matrices are too small for more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for soak.json and soak.png (soak_redis.* with --redis)")


def tiny_llama():
    """A random 4-layer Llama (the test suite's tiny model)."""
    import transformers as tf

    torch.manual_seed(1234)
    cfg = tf.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.1, tie_word_embeddings=False, rope_theta=10000.0)
    return tf.LlamaForCausalLM(cfg).eval()


def load_engine(name: str):
    from cacheblend_ext.blend.engine import BlendConfig, BlendEngine

    if name == "tiny":
        return BlendEngine(tiny_llama(), config=BlendConfig(recompute_ratio=0.15))
    from cacheblend_ext.blend.models import load_model

    model, tok = load_model(name)
    return BlendEngine(model, tok, BlendConfig(recompute_ratio=0.15))


# ---------------------------------------------------------------------------
# measuring the process
# ---------------------------------------------------------------------------


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_threads() -> int:
    """Threads of the process as the kernel sees them (Python's and native ones)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()


def sample(blend_index: int, blender, t0: float) -> dict:
    gc.collect()
    _trim_heap()
    st = blender.store.stats()
    disk_dir = blender.store.disk_dir
    return {"blend": blend_index, "seconds": time.perf_counter() - t0, "rss_mb": rss_mb(), "open_fds": open_fds(),
            "threads": os_threads(), "cpu_bytes": st["bytes"]["cpu"], "disk_bytes": st["bytes"]["disk"],
            "disk_files": len(blender.store.keys("disk", scope=SOAK_SCOPE)) if disk_dir is not None else 0,
            "hits": dict(st["hits"]), "misses": st["misses"], "evictions": dict(st["evictions"]),
            "corrupt": st["corrupt"]}


def slope_per_100(xs, ys) -> float:
    """Least-squares growth of ``ys`` per 100 blends."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def summarize(samples: list, budgets: dict) -> dict:
    warm = samples[max(1, len(samples) // 5):] or samples
    xs = [s["blend"] for s in warm]
    out = {"warmup_blends": warm[0]["blend"], "budgets": budgets}
    for name in ("rss_mb", "open_fds", "threads", "cpu_bytes", "disk_bytes"):
        ys = [s[name] for s in warm]
        out[name] = {"after_warmup": ys[0], "end": ys[-1], "min": min(ys), "max": max(ys),
                     "growth_per_100_blends": slope_per_100(xs, ys)}
    return out


# ---------------------------------------------------------------------------
# the soak
# ---------------------------------------------------------------------------


def random_request(rng: random.Random, pool: list, vocab: int):
    k = rng.randint(2, min(5, len(pool)))
    chunks = [pool[i] for i in rng.sample(range(len(pool)), k)]
    query = torch.tensor([rng.randrange(3, vocab) for _ in range(rng.randint(4, 12))])
    return chunks, query


def run_soak(engine, *, blends: int, pool_size: int = 48, min_tokens: int = 8, max_tokens: int = 64,
             cpu_fraction: float = 0.25, disk_fraction: float = 0.5, sample_every: int = 10, check_every: int = 10,
             remote=None, seed: int = 0, disk_dir=None, progress=None) -> dict:
    """Runs the soak and returns ``{"samples", "summary", "mismatches", ...}``; raises
    nothing for a mismatch (the caller decides), every blend is still completed."""
    from cacheblend_ext.cached import CachedBlender

    rng = random.Random(seed)
    vocab = int(engine.model.config.vocab_size)
    lo = min(vocab - 1, 3)
    pool = [torch.tensor([rng.randrange(lo, vocab) for _ in range(rng.randint(min_tokens, max_tokens))])
            for _ in range(pool_size)]
    per_token = engine.num_layers * 2 * engine.num_kv_heads * engine.head_dim * engine.dtype.itemsize
    pool_bytes = sum(int(c.numel()) for c in pool) * per_token
    budgets = {"cpu": int(cpu_fraction * pool_bytes), "disk": int(disk_fraction * pool_bytes), "pool": pool_bytes}
    prefix = torch.tensor(engine.bos_ids() + [7, 9])
    tmp = None
    if disk_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cacheblend-soak-")
        disk_dir = tmp.name
    blender = CachedBlender(engine, disk_dir=disk_dir, cpu_bytes=budgets["cpu"], disk_bytes=budgets["disk"],
                            remote=remote)
    samples, mismatches, checks = [], 0, 0
    t0 = time.perf_counter()
    try:
        samples.append(sample(0, blender, t0))
        for i in range(1, blends + 1):
            chunks, query = random_request(rng, pool, vocab)
            result, _ = blender.blend(prefix, chunks, query, scope=SOAK_SCOPE)
            if check_every and i % check_every == 0:
                context = engine.chunk_context(prefix)
                ref = engine.blend([prefix] + [engine.encode_chunk(c, context) for c in chunks] + [query])
                checks += 1
                mismatches += int(not torch.equal(result.logits, ref.logits))
                del ref
            del result
            if i % sample_every == 0 or i == blends:
                samples.append(sample(i, blender, t0))
                if progress is not None:
                    progress(samples[-1])
        final_stats = blender.store.stats()
    finally:
        blender.store.close()
        if tmp is not None:
            tmp.cleanup()
    return {"samples": samples, "summary": summarize(samples, budgets), "checks": checks, "mismatches": mismatches,
            "store_stats": final_stats, "budgets": budgets}


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    x = [p["blend"] for p in s]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot(x, [p["rss_mb"] for p in s])
    ax[0, 0].set_ylabel("resident memory, MiB")
    ax[0, 1].plot(x, [p["open_fds"] for p in s], label="open files (/proc/self/fd)")
    ax[0, 1].plot(x, [p["threads"] for p in s], label="threads")
    ax[0, 1].set_ylim(bottom=0)
    ax[0, 1].legend()
    kib = 1 / 1024
    ax[1, 0].plot(x, [p["cpu_bytes"] * kib for p in s], label="CPU tier")
    ax[1, 0].plot(x, [p["disk_bytes"] * kib for p in s], label="disk tier")
    ax[1, 0].axhline(result["budgets"]["cpu"] * kib, ls="--", c="C0", lw=0.8, label="CPU budget")
    ax[1, 0].axhline(result["budgets"]["disk"] * kib, ls="--", c="C1", lw=0.8, label="disk budget")
    ax[1, 0].set_ylabel("store bytes, KiB")
    ax[1, 0].legend()
    for tier in ("cpu", "disk", "remote"):
        ys = [p["hits"].get(tier, 0) for p in s]
        if any(ys):
            ax[1, 1].plot(x, ys, label=f"{tier} hits")
    ax[1, 1].plot(x, [p["misses"] for p in s], label="misses (encoded)")
    ax[1, 1].plot(x, [p["evictions"].get("cpu", 0) + p["evictions"].get("disk", 0) for p in s], label="evictions")
    ax[1, 1].set_ylabel("cumulative count")
    ax[1, 1].legend()
    for a in ax.flat:
        a.set_xlabel("blends")
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    threads = args.threads or (1 if args.model == "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    engine = load_engine(args.model)
    server = None
    if args.redis:
        from cacheblend_ext.testing.redis_server import RedisServer

        server = RedisServer().start()
    try:
        with torch.inference_mode():
            result = run_soak(engine, blends=args.blends, pool_size=args.pool, min_tokens=args.min_tokens,
                              max_tokens=args.max_tokens, cpu_fraction=args.cpu_fraction,
                              disk_fraction=args.disk_fraction, sample_every=args.sample_every,
                              check_every=args.check_every, remote=server.url if server else None, seed=args.seed,
                              progress=lambda p: common.progress(
                                  f"blend {p['blend']}: rss {p['rss_mb']:.1f} MiB, {p['open_fds']} fds, "
                                  f"{p['threads']} threads, cpu {p['cpu_bytes']} B, disk {p['disk_bytes']} B"))
    finally:
        if server is not None:
            server.stop()
    summary = result["summary"]
    table = common.Table(f"soak: {args.blends} blends of random requests, {args.model}, "
                         f"{result['checks']} checked against in-memory blends, {result['mismatches']} mismatches",
                         ["curve", "after warm-up", "end", "min", "max", "growth / 100 blends"])
    for name in ("rss_mb", "open_fds", "threads", "cpu_bytes", "disk_bytes"):
        c = summary[name]
        table.add(name, c["after_warmup"], c["end"], c["min"], c["max"], c["growth_per_100_blends"])
    print(table.render())
    print(f"budgets: cpu {result['budgets']['cpu']} B, disk {result['budgets']['disk']} B "
          f"(pool of {args.pool} chunks: {result['budgets']['pool']} B)")
    out = {"command": COMMAND, "env": common.environment("cpu"), "args": vars(args), **result,
           "table": table.as_dict()}
    if args.out:
        path = Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        stem = "soak_redis" if args.redis else "soak"
        common.write_json(out, str(path / f"{stem}.json"))
        plot(result, path / f"{stem}.png", f"{args.blends} random blends through CachedBlender ({args.model}, "
                                           f"RAM + disk tiers{' + Redis' if args.redis else ''})")
        print(f"wrote {path / f'{stem}.png'}")
    return out
