"""Timing, bandwidth and reporting helpers shared by the benchmark commands.

GPU timing: CUDA events around each call, a large buffer written between calls to flush
L2 (the working sets fit in L2), warm-up first, the median reported. CPU timing:
``time.perf_counter`` medians. Percentages of peak are against a *measured* copy
bandwidth (device-to-device on a GPU, memcpy on the CPU) and the datasheet dense bf16
tensor-core rate of the card.

"% of copy BW" = the bytes an op must move (read + written, each once) per second, over
the same count for a copy of a buffer larger than the caches (:class:`CopyReference`).
On the CPU the copy is timed in the same rounds as the implementations
(:func:`time_interleaved`). Timed once before them, as it used to be, the copy could run
while other processes loaded the memory and the op in a quiet moment: with a process
copying memory beside the copy's measurement only, kv_deviation on a 2-core CPU showed
469% and 824% of "copy BW" (25% on the same machine without). Memory traffic that lasts through the whole run still slows the
copy more than a partly compute-bound op: the table then says so under it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# Datasheet dense (no sparsity) bf16 tensor-core peaks, TFLOP/s.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A40": 149.7, "L40S": 362.0, "L40": 181.0}


# The ops the blend engine calls, recorded with end-to-end results: each one is
# torch.ops.cacheblend.<name> (there is no other backend).
ENGINE_OPS = ("fused_kv_concat", "kv_deviation", "select_hkvd", "sparse_query_attention")


def engine_op_backends() -> dict[str, str]:
    """``{op name: "op"}`` for the ops the engine uses, for benchmark records."""
    return {name: "op" for name in ENGINE_OPS}


def add_common_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 5 GPU, 2 CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 50 GPU, 10 CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def resolve_dtype(args) -> torch.dtype:
    if args.dtype is None:
        return torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float32": torch.float32, "fp32": torch.float32}[args.dtype]


def iterations(args) -> tuple[int, int]:
    gpu = args.device.startswith("cuda")
    return (args.warmup if args.warmup is not None else (5 if gpu else 2),
            args.iters if args.iters is not None else (50 if gpu else 10))


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


class _L2Flusher:
    def __init__(self, device):
        self.buffer = None
        if torch.device(device).type == "cuda":
            size = 2 * torch.cuda.get_device_properties(device).L2_cache_size
            self.buffer = torch.empty(max(size, 64 << 20) // 4, dtype=torch.int32, device=device)

    def __call__(self):
        if self.buffer is not None:
            self.buffer.fill_(0x5A5A)


def time_fn(fn: Callable[[], object], device, warmup: int, iters: int, flush_l2: bool = True) -> dict:
    """Median / min / max milliseconds of ``fn()``."""
    times = []
    if torch.device(device).type == "cuda":
        flusher = _L2Flusher(device) if flush_l2 else (lambda: None)
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            flusher()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(warmup):
            fn()
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": iters}


def time_interleaved(impls: dict, warmup: int, iters: int) -> dict:
    """CPU medians (as :func:`time_fn`) of several implementations timed round-robin, one
    call of each per round, so that load from other processes hits them all alike."""
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in impls}
    for _ in range(iters):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "iters": iters}
            for name, t in times.items()}


class CopyReference:
    """The reference of the "% of copy BW" columns: ``dst.copy_(src)`` of a buffer larger
    than the caches (256 MiB on a GPU, 128 MiB on the CPU), counting bytes read plus bytes
    written. Call it to time it beside the implementations."""

    NAME = "copy (reference)"

    def __init__(self, device, nbytes: int | None = None):
        if nbytes is None:
            nbytes = (256 << 20) if torch.device(device).type == "cuda" else (128 << 20)
        self.src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
        self.dst = torch.empty_like(self.src)
        self.bytes = 2 * nbytes

    def __call__(self) -> None:
        self.dst.copy_(self.src)

    def gbps(self, median_ms: float) -> float:
        return self.bytes / (median_ms * 1e-3) / 1e9

    def describe(self, gbps: float, percentages=()) -> str:
        """The line under a table: the reference, and what a value over 100% means."""
        text = (f"copy bandwidth: {gbps:.1f} GB/s ({self.bytes // 2 >> 20} MiB copied, bytes read + written, "
                "timed in the same rounds as the implementations)")
        if any(p > 100 for p in percentages):
            text += ("\nover 100%: the copy ran slower than the bytes of that implementation would allow. A copy "
                     "is all memory traffic; an op that is partly compute bound (or that mostly reads) loses less "
                     "to other processes' memory traffic on a shared machine. Rerun on a quiet machine.")
        return text


def quiet_cuda_home_warning() -> None:
    """torch.compile's CPU code generation imports ``torch.utils.cpp_extension``, which
    logs "No CUDA runtime is found" with a CUDA build of torch on a machine with the CUDA
    toolkit but no GPU. Nothing here needs a CUDA runtime then: import it once, with that
    warning silenced. A no-op with a GPU or a CPU build of torch (which never warn)."""
    if torch.cuda.is_available() or torch.version.cuda is None or "torch.utils.cpp_extension" in sys.modules:
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        logger.setLevel(level)


def measure_copy_bandwidth(device, nbytes: int = 256 << 20) -> float:
    """Measured copy bandwidth in GB/s, counting bytes read plus bytes written."""
    if torch.device(device).type != "cuda":
        nbytes = min(nbytes, 128 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=20, flush_l2=False)
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


def measure_bf16_matmul_tflops(device, size: int = 8192) -> float:
    """A bf16 matrix product of random ``size``-square matrices through PyTorch, in TFLOP/s:
    the tensor-core rate this card actually reaches, beside its datasheet peak."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    t = time_fn(lambda: a @ b, device, warmup=3, iters=10, flush_l2=False)
    return 2 * size ** 3 / (t["median_ms"] * 1e-3) / 1e12


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bf16_peak_tflops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def maybe_compile(fn, args):
    """``torch.compile(fn)`` unless disabled; None when compilation is unavailable."""
    if args.no_compile:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as exc:  # pragma: no cover - depends on the installation
        progress(f"torch.compile unavailable: {exc}")
        return None


@dataclass
class Table:
    """A result table: printed for people, kept as rows for JSON."""

    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)

    def add(self, *values) -> None:
        self.rows.append(list(values))

    def render(self) -> str:
        cells = [[_fmt(v) for v in row] for row in self.rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(self.columns)]
        line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
        out = [self.title, line(self.columns), line(["-" * w for w in widths])]
        out += [line(r) for r in cells]
        return "\n".join(out)

    def as_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def environment(device) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,  # other work on the machine
    }


def write_json(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {path}")
