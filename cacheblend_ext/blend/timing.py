"""How long a blend's steps took: :class:`StepTimer`, behind ``BlendResult.timings``.

On a GPU the engine's work is asynchronous: a host clock around a step measures how long
the host took to *enqueue* it. So on CUDA each span is a pair of CUDA events recorded on
the current stream, read once the blend has synchronised at its end; the time between
them is the device's time from the step's first to its last operation, including any
time the device waited for the host to enqueue more (a host-bound step shows as such).
On the CPU the work is synchronous and spans are ``time.perf_counter`` intervals. What
each entry measures: :class:`~cacheblend_ext.blend.request.BlendResult`.
"""

from __future__ import annotations

import contextlib
import time

import torch

# The spans a blend times unless it profiles (BlendEngine.blend(profile=True) times all).
DEFAULT_SPANS = ("probe", "concat", "select")


class StepTimer:
    """Spans of named steps on ``device`` (CUDA events there, host clocks elsewhere).

    ``with timer.span(name):`` times one occurrence; a span opened with
    ``exclusive=True`` does not count the spans nested in it. ``enabled`` lists the names
    timed (others are no-ops; None: all). :meth:`result` reads the sums in ms; on CUDA
    call it after the device has finished the work (the blend's final sync)."""

    def __init__(self, device, enabled=None):
        self.cuda = torch.device(device).type == "cuda"
        self.enabled = None if enabled is None else set(enabled)
        self.spans = {}  # name -> [(start, end, [nested (start, end)])]
        self.open = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str, exclusive: bool = False):
        if self.enabled is not None and name not in self.enabled:
            yield
            return
        nested = [] if exclusive else None
        self.open.append(nested)
        start = self.mark()
        try:
            yield
        finally:
            end = self.mark()
            self.open.pop()
            for outer in self.open:
                if outer is not None:
                    outer.append((start, end))
            self.spans.setdefault(name, []).append((start, end, nested or []))

    def elapsed(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def result(self) -> dict:
        """``{name + "_ms": total}`` of the spans recorded so far."""
        out = {}
        for name, spans in self.spans.items():
            out[f"{name}_ms"] = sum(self.elapsed(s, e) - sum(self.elapsed(a, b) for a, b in nested)
                                    for s, e, nested in spans)
        return out
