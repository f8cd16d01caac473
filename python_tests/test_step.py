"""The selective layers' step: one function of static-shaped tensors that torch.compile
traces whole, and the CUDA-graph runner's bookkeeping, exercised on the CPU with a
capture that defers the step to its replay (as a CUDA graph does)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.blend.step import CUDAGraphStep, selective_layer
from helpers import request_parts, tiny_model



class DeferredCapture:
    """``capture(fn)``: records ``fn`` without running it; ``replay()`` runs it. This is the
    contract of a CUDA graph (capture records, replay executes on the captured tensors),
    so a runner that relied on capture executing anything would fail here."""

    def __init__(self):
        self.captured = 0

    def __call__(self, fn):
        self.captured += 1
        return type("Replay", (), {"replay": staticmethod(fn)})()


@pytest.fixture(scope="module")
def engine():
    return BlendEngine(tiny_model("llama"), None, BlendConfig(recompute_ratio=0.3))


def make_request(engine, seed=0, sizes=(19, 26, 13)):
    prefix, chunk_ids, query = request_parts(seed, sizes)
    return [prefix, *[engine.encode_chunk(c) for c in chunk_ids], query]


def step_inputs(engine, m=7, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = engine.decoder
    hidden = torch.randn(m, d.model.config.hidden_size, generator=g)
    q_pos = torch.randperm(n, generator=g)[:m].sort().values
    cos, sin = d.rotary_angles(hidden, q_pos)
    k = torch.randn(n, d.num_kv_heads, d.head_dim, generator=g)
    return hidden, cos, sin, q_pos, k, torch.randn_like(k)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
def test_selective_layer_compiles_fullgraph(engine, batched):
    """The step compiles as one graph (fullgraph=True fails on any graph break) and gives the
    eager result, KV writes included."""
    torch._dynamo.reset()
    hidden, cos, sin, q_pos, k, v = step_inputs(engine)
    slots, extra = q_pos, {}
    if batched:  # two requests: rows 0..2 in request 0 (KV rows 0..15), the rest in request 1
        q_pos = torch.cat([q_pos[:3] % 16, q_pos[3:] % 24])
        slots = torch.cat([q_pos[:3], q_pos[3:] + 16])
        extra = dict(q_indptr=torch.tensor([0, 3, 7]), kv_indptr=torch.tensor([0, 16, 40]))
    layer = engine.decoder.layers[1]
    fn = functools.partial(selective_layer, engine.decoder, layer)
    with torch.no_grad():
        k_ref, v_ref = k.clone(), v.clone()
        ref = fn(hidden, cos, sin, q_pos, slots, k_ref, v_ref, **extra)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        out = compiled(hidden, cos, sin, q_pos, slots, k, v, **extra)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(k, k_ref)
    torch.testing.assert_close(v, v_ref)
    assert not torch.equal(k_ref[slots], step_inputs(engine)[4][slots])  # the step did write the rows' K


def test_graph_step_replays_what_eager_computes(engine):
    """Blends through the graph runner equal eager blends; the first blend of a shape
    captures each selective layer once, later ones only replay; a new shape captures anew."""
    capture = DeferredCapture()
    step = CUDAGraphStep("cpu", capture=capture)
    seg = make_request(engine)
    cfg = BlendConfig(recompute_ratio=0.3)
    ref = engine.blend(seg, cfg)
    # every selective layer, the probe's check layer 0 included (it selects before the projections)
    selective = sum(1 for s in ref.selected if s is not None)
    assert selective == engine.num_layers
    for i in range(3):
        res = engine.blend(seg, cfg, step=step)
        assert torch.equal(res.logits, ref.logits)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(res.selected, ref.selected))
        for got, want in zip(res.cache.layers, ref.cache.layers):
            assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        assert capture.captured == selective and step.replays == selective * (i + 1)
    kbuf = step.kv_buffers((engine.num_layers, engine.num_kv_heads, ref.num_tokens, engine.head_dim), engine.dtype)
    assert res.cache.layers[-1].keys.data_ptr() == kbuf[0][-1].data_ptr()  # the blend ran in the step's buffers
    other = make_request(engine, seed=1, sizes=(30, 11))
    res = engine.blend(other, cfg, step=step)
    assert torch.equal(res.logits, engine.blend(other, cfg).logits)
    assert capture.captured > selective


def test_graph_step_refuses_a_foreign_kv_buffer(engine):
    step = CUDAGraphStep("cpu", capture=DeferredCapture())
    seg = make_request(engine)
    engine.blend(seg, step=step)
    step.kv = tuple(t.clone() for t in step.kv)  # graphs captured on the old buffers
    with pytest.raises(RuntimeError, match="not the buffer its graph was captured with"):
        engine.blend(seg, step=step)


def test_graph_step_needs_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got device 'cpu'"):
        CUDAGraphStep("cpu")


def test_bench_e2e_graph_option(monkeypatch, tmp_path, capsys):
    """``bench e2e --cuda-graph``: refused on the CPU with the argument named; with the
    CUDA check lifted and a deferred capture, the random-7b command line (a tiny model
    here) runs its rows eagerly and from graphs, from memory and from the store's CPU tier,
    and the graph rows give the eager rows' first token."""
    import bench.e2e as e2e
    from bench.__main__ import main
    from cacheblend_ext.blend import step as step_module

    argv = ["e2e", "--model", "random-7b", "--device", "cpu", "--ratios", "0,15,100", "--source", "memory,ram",
            "--chunks", "3", "--chunk-tokens", "24", "--query-tokens", "8", "--warmup", "2", "--iters", "1"]
    with pytest.raises(SystemExit, match="--cuda-graph both needs --device cuda"):
        main(argv + ["--cuda-graph", "both"])
    monkeypatch.setattr(e2e, "random_7b", lambda device, dtype: tiny_model("mistral").to(device, dtype))
    monkeypatch.setattr(e2e, "graph_modes", lambda args: [False, True])
    monkeypatch.setattr(step_module, "CUDAGraphStep", functools.partial(CUDAGraphStep, capture=DeferredCapture()))
    out = tmp_path / "e2e.json"
    main(argv + ["--json", str(out)])
    result = json.loads(out.read_text())
    names = [r["method"] for r in result["rows"]]
    assert "CacheBlend 15% [ram, graph]" in names and "CacheBlend 15% [memory]" in names
    checks = result["graph_check"]
    assert set(checks) == {n for n in names if n.endswith("graph]")} and len(checks) == 6
    for name, c in checks.items():
        assert c["same_token"] and c["max_abs_logit_diff"] == 0.0, name
        assert (c["captures"] > 0) == ("100%" not in name), name  # ratio 1: no selective layer
