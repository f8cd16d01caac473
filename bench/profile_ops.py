"""Where a call's time goes, for ``bench e2e --profile``: the operations PyTorch ran,
grouped by kind, and the rest of the wall time (Python and framework overhead).

Each operation called from Python (a top-level operator event of ``torch.profiler``) is
charged with its whole time, nested operators included (the matrix products inside
``sparse_query_attention`` count as attention); ``python and dispatch`` is the wall time
no top-level operator covers: the Python of the engine and of the model's modules, and
the dispatch between operators. On a GPU the operator times are the host's launch times,
so this breakdown is for the CPU; the blend's own step timings (CUDA events) hold there.
"""

from __future__ import annotations

import time

import torch

# kind -> operator names (an operator is charged to the first kind that lists it)
KINDS = {
    "GEMM (projections, MLP)": ("aten::linear", "aten::mm", "aten::addmm", "aten::matmul"),
    "attention": ("cacheblend::sparse_query_attention", "cacheblend::sparse_query_attention_paged",
                  "aten::scaled_dot_product_attention"),
    "small GEMMs (einsum, bmm)": ("aten::einsum", "aten::bmm", "aten::baddbmm"),
    "KV placement (fused_kv_concat)": ("cacheblend::fused_kv_concat",),
    "selection (deviation, top-k)": ("cacheblend::kv_deviation", "cacheblend::kv_deviation_out",
                                     "cacheblend::select_hkvd", "cacheblend::select_hkvd_batched"),
    "copies and indexing": ("aten::copy_", "aten::index_copy_", "aten::index_put_", "aten::index", "aten::cat",
                            "aten::clone", "aten::contiguous", "aten::index_select", "aten::index_fill_",
                            "aten::stack", "aten::split", "aten::embedding", "aten::fill_", "aten::zero_",
                            "aten::masked_fill", "aten::masked_fill_", "aten::zeros", "aten::empty",
                            "aten::empty_like", "aten::lift_fresh", "aten::pin_memory"),
    "dtype casts (upcasts)": ("aten::to", "aten::_to_copy", "aten::type_as"),
}


def kind_of(name: str) -> str:
    for kind, names in KINDS.items():
        if name in names:
            return kind
    return "elementwise, norms, softmax"


def op_breakdown(fn) -> dict:
    """Run ``fn()`` once under the profiler; ``{kind: ms}`` of its top-level operators
    plus ``"python and dispatch"`` (the wall time left over) and ``"wall"``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t0) * 1e3
    out = {kind: 0.0 for kind in [*KINDS, "elementwise, norms, softmax"]}
    for event in prof.events():
        if event.cpu_parent is not None or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        out[kind_of(event.name)] += event.cpu_time_total / 1e3
    ops = sum(out.values())
    out["python and dispatch"] = max(wall - ops, 0.0)
    out["wall"] = wall
    return out


STEPS = ("plan_ms", "probe_ms", "concat_ms", "layers_ms", "select_ms", "step_ms", "finish_ms")


def profile_rows(rows: list, full_prefill, iters: int, device: str) -> dict:
    """``bench e2e --profile``: for each ``(name, fn)`` CacheBlend row (``fn(profile=True)``
    blends with every step timed), the median of each step over ``iters`` blends and of
    the rest of the call; on the CPU also the operations of one blend by kind, beside those
    of ``full_prefill`` (a ``(name, ratio, fn)`` row, or None). Prints both tables."""
    from bench import common
    import statistics

    steps = {}
    for name, fn in rows:
        samples = [fn(profile=True).timings for _ in range(iters)]
        med = {k: statistics.median(t.get(k, 0.0) for t in samples) for k in (*STEPS, "total_ms")}
        med["other_ms"] = max(med["total_ms"] - sum(med[k] for k in STEPS), 0.0)
        steps[name] = med
    table = common.Table("Per-step breakdown (ms, medians; blend(profile=True): CUDA events on a GPU)",
                         ["method", *[k[:-3] for k in STEPS], "other", "total", "probe share"])
    for name, med in steps.items():
        table.add(name, *[med[k] for k in STEPS], med["other_ms"], med["total_ms"],
                  med["probe_ms"] / med["total_ms"])
    print(table.render())
    out = {"steps": steps, "steps_table": table.as_dict()}
    if device.startswith("cuda"):
        return out
    ops = {name: op_breakdown(fn) for name, fn in rows}
    if full_prefill is not None:
        ops = {full_prefill[0]: op_breakdown(full_prefill[2]), **ops}
    kinds = [*KINDS, "elementwise, norms, softmax", "python and dispatch"]
    table = common.Table("Operations by kind (ms of one call under torch.profiler, top-level operators with what "
                         "they call; 'python and dispatch': the wall time they leave)", ["kind", *ops])
    for kind in [*kinds, "wall"]:
        table.add(kind, *[ops[name][kind] for name in ops])
    print(table.render())
    out["operations"] = ops
    out["operations_table"] = table.as_dict()
    return out
