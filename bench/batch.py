"""Batched blend: ``BlendEngine.blend_batch`` of B requests against B single blends of the
same requests, timed round-robin in the same run (requests/s and the speed-up), with each
batched result checked against its single blend (same selection, logits within 1e-5)."""

from __future__ import annotations

import statistics
import time

import torch

from bench import common

COMMAND = "batch"
HELP = "batched blend of B requests vs B single blends: throughput and equality"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="bundled model name or local HF model dir")
    parser.add_argument("--batch", type=int, default=8, help="requests per batch")
    parser.add_argument("--chunks", default="2,6", help="min,max chunks per request")
    parser.add_argument("--chunk-tokens", default="64,400", help="min,max tokens per chunk")
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=15.0, help="recompute budget in percent")
    parser.add_argument("--scheme", default="default", choices=["default", "published"])


def run(args) -> dict:
    with torch.inference_mode():
        return _run(args)


def _run(args) -> dict:
    from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
    from cacheblend_ext.blend.models import load_model

    dtype = common.resolve_dtype(args)
    warmup, iters = common.iterations(args)
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    r = args.ratio / 100
    cfg = BlendConfig(recompute_ratio=r) if args.scheme == "default" else BlendConfig.published(r)
    engine = BlendEngine(model, tok, cfg)
    common.progress(f"kernels: {common.engine_op_backends()}")
    lo_c, hi_c = (int(x) for x in args.chunks.split(","))
    lo_t, hi_t = (int(x) for x in args.chunk_tokens.split(","))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prefix = torch.tensor(engine.bos_ids() + torch.randint(100, vocab, (7,), generator=g).tolist())
    context = engine.chunk_context(prefix)
    requests = []
    for _ in range(args.batch):
        count = int(torch.randint(lo_c, hi_c + 1, (1,), generator=g))
        chunks = [torch.randint(100, vocab, (int(torch.randint(lo_t, hi_t + 1, (1,), generator=g)),), generator=g)
                  for _ in range(count)]
        query = torch.randint(100, vocab, (args.query_tokens,), generator=g)
        requests.append([prefix, *engine.encode_chunks(chunks, context=context), query])
    tokens = [engine.plan_request(r_, cfg).num_tokens for r_ in requests]

    singles = [engine.blend(r_) for r_ in requests]
    batched = engine.blend_batch(requests)
    max_err = max(float((b.logits - s.logits).abs().max() / s.logits.abs().max()) for b, s in zip(batched, singles))
    same_selection = all(all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                             for x, y in zip(b.selected, s.selected)) for b, s in zip(batched, singles))

    methods = {f"{args.batch} single blends": lambda: [engine.blend(r_) for r_ in requests],
               f"blend_batch of {args.batch}": lambda: engine.blend_batch(requests)}
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in methods}
    for i in range(iters):  # round-robin, so load from other processes hits both alike
        common.progress(f"round {i + 1}/{iters}")
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    table = common.Table(
        f"Batched blend, {args.model} ({dtype}) on {common.device_name(args.device)}: {args.batch} requests of "
        f"{min(tokens)}-{max(tokens)} tokens ({sum(tokens)} in all), {args.scheme} scheme at {args.ratio:g}%; "
        f"batched vs single: same selection {same_selection}, max logit error {max_err:.1e} (relative)",
        ["method", "median ms", "min ms", "requests/s", "speed-up"])
    rows, base = [], None
    for name, xs in samples.items():
        med = statistics.median(xs)
        base = base or med
        rows.append({"method": name, "median_ms": med, "min_ms": min(xs), "samples_ms": xs,
                     "requests_per_s": args.batch / med * 1e3, "speedup": base / med})
        table.add(name, med, min(xs), args.batch / med * 1e3, base / med)
    print(table.render())
    return {"command": COMMAND, "environment": common.environment(args.device),
            "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
            "tokens": tokens, "same_selection": same_selection, "max_logit_error": max_err, "rows": rows}
