"""How many CPU threads a blend should use: as many as the cores other processes leave free.

PyTorch's default intra-op thread count is the number of cores, whether or not other
processes use them. Every parallel operator then waits at its end for all its threads;
on a core that another process keeps busy, a thread runs only in the scheduler's time
slices, so each parallel operator can wait milliseconds. A full prefill's operators are
large and few per unit of work; a blend's are small and many (a few hundred rows per
layer), so the blend suffers several times more: with one core of two busy, a blend at
ratio 0 went from 0.5 s (one thread) to 5.4 s (two threads). :class:`CoreMonitor`
measures the cores in use by other processes (``/proc/stat`` minus this process's own CPU
time, between two calls), and :func:`intra_op_threads` runs a block with that many fewer
threads.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch


def _busy_seconds() -> float | None:
    """CPU time spent by all processes on all cores (user, nice, system, irq, softirq,
    steal), in seconds, or None where ``/proc/stat`` is not readable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in (fields[1:9] + ["0"] * 8)[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CoreMonitor:
    """Cores left free by other processes, measured over the time since the last reading.

    :meth:`free_cores` compares the machine's busy CPU time with this process's own CPU
    time (``time.process_time``) over the interval since the previous reading that was at
    least ``min_interval_s`` long (shorter intervals keep the previous estimate; the
    clock ticks are 10 ms)."""

    def __init__(self, min_interval_s: float = 0.2):
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.min_interval_s = min_interval_s
        self.last = self._reading()
        self.estimate = None

    @staticmethod
    def _reading():
        return time.monotonic(), _busy_seconds(), time.process_time()

    def free_cores(self) -> float:
        """Cores not used by other processes (``self.cores`` where nothing is known)."""
        now = self._reading()
        wall = now[0] - self.last[0]
        if now[1] is None or self.last[1] is None:
            return float(self.cores)
        if wall >= self.min_interval_s:
            others = max((now[1] - self.last[1]) - (now[2] - self.last[2]), 0.0) / wall
            self.estimate = max(self.cores - others, 0.0)
            self.last = now
        return self.estimate if self.estimate is not None else float(self.cores)

    def threads(self, limit: int) -> int:
        """Threads for the next block of work: the free cores (rounded), 1 to ``limit``."""
        return max(1, min(limit, int(self.free_cores() + 0.5)))


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """Run the block with ``n`` intra-op threads (``torch.set_num_threads``; process-wide),
    restoring the previous count after; ``None`` changes nothing."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threaded(method):
    """Run a method under its object's thread policy: ``with self.threads(): ...``."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.threads():
            return method(self, *args, **kwargs)
    return wrapper


def parse_cpu_threads(value: str, name: str = "cpu_threads"):
    """A command line's thread policy for ``BlendEngine(cpu_threads=...)``: ``"auto"``,
    ``"torch"`` (None: torch's own setting) or a positive count."""
    if value in ("auto", "torch"):
        return None if value == "torch" else "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise SystemExit(f"{name} must be auto, torch or a positive count, got {value!r}")
    return n
