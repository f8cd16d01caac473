"""``python -m bench mac``: the cost of verifying stored chunk KV, per algorithm.

What the loader thread computes for every layer of every chunk it reads from disk or
Redis: the crc32 (no MAC key) or the keyed MAC (``cacheblend_ext.store.integrity``:
HMAC-SHA256, keyed BLAKE2b), on buffers of one chunk's layer (by default the bundled
SmolLM2-135M's: 512 tokens x 2 x 3 KV heads x 64 x fp32 = 768 KiB), one core. Reported:
throughput (median over rounds, the algorithms round-robin) and the time for the 180
layer-chunks (30 layers x 6 chunks) of the end-to-end bench's request.
"""

from __future__ import annotations

import os
import statistics
import time
import zlib

from bench import common
from cacheblend_ext.store.chunk_format import mac_context
from cacheblend_ext.store.integrity import ChunkMac

COMMAND = "mac"
HELP = "throughput of crc32, HMAC-SHA256 and keyed BLAKE2b on one layer of a chunk (what the loader verifies)"


def add_arguments(parser) -> None:
    parser.add_argument("--layer-bytes", type=int, default=512 * 2 * 3 * 64 * 4,
                        help="bytes of one chunk's layer (default: SmolLM2-135M, 512 tokens, fp32)")
    parser.add_argument("--layers-per-request", type=int, default=180, help="layer-chunks of one request")


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted({x for x in line.split(":", 1)[1].split() if x in ("sha_ni", "avx2", "avx512f")})
    except OSError:
        pass
    return []


def run(args) -> dict:
    warmup = args.warmup if args.warmup is not None else 20
    iters = args.iters if args.iters is not None else 400
    data = memoryview(os.urandom(args.layer_bytes))
    key = os.urandom(32)
    context = mac_context("layer", "tenant", "k" * 40, 7)
    hmac_sha256, blake2b = ChunkMac(key, "hmac-sha256"), ChunkMac(key, "blake2b")
    algorithms = {"crc32 (no key)": lambda: zlib.crc32(data),
                  "HMAC-SHA256": lambda: hmac_sha256.tag(context, data),
                  "keyed BLAKE2b": lambda: blake2b.tag(context, data)}
    samples = {name: [] for name in algorithms}
    for it in range(warmup + iters):
        for name, fn in algorithms.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if it >= warmup:
                samples[name].append(dt)
    flags = ", ".join(_cpu_flags())
    table = common.Table(f"Verifying one {args.layer_bytes / 1024:.0f} KiB layer on one core ({flags})",
                         ["algorithm", "GB/s", "us per layer", f"ms per request ({args.layers_per_request} layers)"])
    results = {}
    for name, xs in samples.items():
        med = statistics.median(xs)
        results[name] = {"median_s": med, "gbps": args.layer_bytes / med / 1e9,
                         "request_ms": med * args.layers_per_request * 1e3}
        table.add(name, results[name]["gbps"], med * 1e6, results[name]["request_ms"])
    print(table.render())
    return {"command": COMMAND, "environment": common.environment("cpu"), "cpu_flags": _cpu_flags(),
            "layer_bytes": args.layer_bytes, "layers_per_request": args.layers_per_request, "warmup": warmup,
            "iters": iters, "table": table.as_dict(), "results": results}
