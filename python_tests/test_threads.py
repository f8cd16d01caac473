"""The engine's CPU thread policy: as many intra-op threads as cores other processes leave free."""

from __future__ import annotations

import pytest
import torch

from cacheblend_ext import threads
from cacheblend_ext.blend.engine import BlendEngine
from cacheblend_ext.threads import CoreMonitor, intra_op_threads
from helpers import request_parts, tiny_model



class FakeMachine:
    """A clock, the machine's busy CPU seconds and this process's CPU seconds, advanced by hand."""

    def __init__(self, monkeypatch):
        self.wall = self.busy = self.own = 0.0
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.wall)
        monkeypatch.setattr(threads.time, "process_time", lambda: self.own)
        monkeypatch.setattr(threads, "_busy_seconds", lambda: self.busy)

    def run(self, seconds, own_cores, other_cores):
        self.wall += seconds
        self.own += seconds * own_cores
        self.busy += seconds * (own_cores + other_cores)


def test_free_cores_leave_out_this_process(monkeypatch):
    machine = FakeMachine(monkeypatch)
    mon = CoreMonitor()
    mon.cores = 4
    assert mon.threads(4) == 4  # nothing measured yet
    machine.run(1.0, own_cores=2, other_cores=1)  # our two threads do not count against us
    assert mon.free_cores() == pytest.approx(3) and mon.threads(4) == 3 and mon.threads(2) == 2
    machine.run(0.05, own_cores=0, other_cores=4)  # too short an interval: the estimate stands
    assert mon.free_cores() == pytest.approx(3)
    machine.run(1.0, own_cores=1, other_cores=3.6)  # 4 busy in all over 1.05 s: about 0.2 free
    assert mon.threads(4) == 1  # never fewer than one


def test_intra_op_threads_restores():
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with intra_op_threads(None):
        assert torch.get_num_threads() == before


def test_engine_thread_policy(monkeypatch):
    model = tiny_model("llama")
    prefix, chunk_ids, query = request_parts(0)
    with pytest.raises(ValueError, match="cpu_threads must be 'auto', a positive int or None"):
        BlendEngine(model, None, cpu_threads=0)
    fixed = BlendEngine(model, None, cpu_threads=1)
    seg = [prefix, *[fixed.encode_chunk(c) for c in chunk_ids], query]
    before = torch.get_num_threads()
    assert fixed.blend(seg).timings["threads"] == 1 and fixed.full_prefill(seg).timings["threads"] == 1
    assert torch.get_num_threads() == before
    machine = FakeMachine(monkeypatch)
    auto = BlendEngine(model, None)
    auto.cores.cores, auto.max_threads = 2, 2
    machine.run(1.0, own_cores=0, other_cores=1)  # one core of two busy
    assert auto.blend(seg).timings["threads"] == 1
    machine.run(1.0, own_cores=1, other_cores=0)  # quiet again
    assert auto.blend(seg).timings["threads"] == 2
    untouched = BlendEngine(model, None, cpu_threads=None)
    assert untouched.blend(seg).timings["threads"] == before
