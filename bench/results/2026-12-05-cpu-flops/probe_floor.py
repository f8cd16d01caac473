"""The probe's floor at 801 tokens: its 8 rows run every layer's linear layers, which read
every weight once, so their time is bounded below by streaming the weights."""
import statistics, time, torch
torch.set_num_threads(1)
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.blend.models import load_model
from bench.e2e import make_request
model, tok = load_model(dtype=torch.float32)
engine = BlendEngine(model, tok, BlendConfig(recompute_ratio=0.15), cpu_threads=1)
linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
nbytes = sum(m.weight.numel() * 4 for m in linears)
def med(fn, n=9):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
with torch.inference_mode():
    for rows in (1, 8, 64):
        x = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
        ms = med(lambda: [m(x[m.in_features]) for m in linears])
        print(f"linear layers of all {len(model.model.layers)} layers, {rows} rows: {ms:.1f} ms ({nbytes/1e6:.0f} MB of weights, {nbytes/ms/1e6:.1f} GB/s)")
    prefix, ids, chunks, query = make_request(engine, [256] * 3, 25)
    segs = [prefix, *chunks, query]
    res = [engine.blend(segs) for _ in range(7)][1:]
    probe = statistics.median(r.timings["probe_ms"] for r in res); total = statistics.median(r.timings["total_ms"] for r in res)
    print(f"801-token blend at 15%: total {total:.0f} ms, probe {probe:.1f} ms ({probe/total:.1%}), probe rows {res[0].probe_tokens} x {res[0].probe_layers} layers")
