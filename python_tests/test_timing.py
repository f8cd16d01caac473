"""BlendResult.timings: what each entry measures, host clocks on the CPU, CUDA events on a GPU."""

from __future__ import annotations

import itertools

import pytest
import torch

from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.blend.timing import StepTimer
from helpers import HAS_CUDA, request_parts, tiny_model



class FakeClock:
    """``mark()`` returns 0, 1, 2, ... (ms apart once read by ``elapsed``)."""

    def __init__(self):
        self.ticks = itertools.count()

    def __call__(self):
        return next(self.ticks) / 1e3


def test_exclusive_spans_leave_out_nested_ones(monkeypatch):
    timer = StepTimer("cpu")
    monkeypatch.setattr(timer, "mark", FakeClock())
    with timer.span("probe", exclusive=True):  # marks 0 .. 5
        with timer.span("concat"):  # 1 .. 2
            pass
        with timer.span("other"):  # 3 .. 4
            pass
    with timer.span("concat"):  # 6 .. 7
        pass
    assert timer.result() == pytest.approx({"probe_ms": 5 - 1 - 1, "concat_ms": 2, "other_ms": 1})


def test_disabled_spans_cost_nothing(monkeypatch):
    timer = StepTimer("cpu", enabled=("concat",))
    clock = FakeClock()
    monkeypatch.setattr(timer, "mark", clock)
    with timer.span("layers"):
        with timer.span("concat"):
            pass
    assert timer.result() == pytest.approx({"concat_ms": 1}) and next(clock.ticks) == 2


@pytest.fixture(scope="module")
def engine():
    return BlendEngine(tiny_model("llama"), None, BlendConfig(recompute_ratio=0.3))


def request(engine):
    prefix, chunk_ids, query = request_parts(0)
    return [prefix, *[engine.encode_chunk(c) for c in chunk_ids], query]


def test_blend_timings(engine):
    seg = request(engine)
    res = engine.blend(seg)
    assert set(res.timings) == {"probe_ms", "concat_ms", "select_ms", "total_ms", "threads"}
    prof = engine.blend(seg, profile=True).timings
    # the probe's selection at layer 0 comes before the projections: every layer is a selective step
    assert set(prof) == {"plan_ms", "probe_ms", "concat_ms", "select_ms", "step_ms", "finish_ms", "total_ms",
                         "threads"}
    assert all(v > 0 for v in prof.values()), prof
    parts = sum(v for k, v in prof.items() if k.endswith("_ms") and k != "total_ms")
    assert parts <= prof["total_ms"] * 1.0001  # disjoint parts of the call
    published = engine.blend(seg, BlendConfig.published(0.3), profile=True).timings
    assert "probe_ms" not in published and published["layers_ms"] > 0  # layers 0 and 1 in full
    batch = engine.blend_batch([seg, seg[:2] + seg[-1:]])
    assert batch[0].timings == batch[1].timings and batch[0].timings["batch_size"] == 2


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_timings_are_events(monkeypatch):
    """On a GPU every span is a pair of CUDA events, read after the blend's final sync."""
    engine = BlendEngine(tiny_model("llama").cuda(), None, BlendConfig(recompute_ratio=0.3))
    recorded = []
    mark = StepTimer.mark

    def spy(self):
        event = mark(self)
        recorded.append(event)
        return event

    monkeypatch.setattr(StepTimer, "mark", spy)
    res = engine.blend(request(engine), profile=True)
    assert recorded and all(isinstance(e, torch.cuda.Event) and e.query() for e in recorded)
    assert all(v > 0 for k, v in res.timings.items() if k.endswith("_ms"))
