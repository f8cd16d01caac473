"""Time to first token of a RAG request (prefix + 6 x 512-token chunks + query, chunk KV
already in memory): full prefill vs prefix caching (only the first chunk's KV reused) vs
full KV reuse vs CacheBlend at several recompute ratios.

``--model random-7b`` builds a Mistral-7B-shaped model with random weights (bf16, meant
for a GPU); anything else is the bundled model or a local Hugging Face directory.
``--source`` picks where the blend reads the reused per-layer KV from (see ``SOURCES``); a
comma-separated list (``--source ram,redis``) times the CacheBlend rows once per source,
round-robin in one process, so the sources can be compared directly.

``--cuda-graph`` (CUDA only) runs the CacheBlend rows' selective layers from CUDA graphs
(:class:`cacheblend_ext.blend.step.CUDAGraphStep`, captured during the warm-up, one per
row): ``on`` times them that way, ``both`` times each row eagerly and with graphs side by
side, and checks that both give the same first token.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from bench import common

COMMAND = "e2e"
HELP = "TTFT of full prefill, prefix caching, full KV reuse and CacheBlend on a 6 x 512-token RAG request"

# Layer sources the blend can read reused KV from: name -> factory(engine, chunks, args)
# returning a layer source (see cacheblend_ext.layer_source) or None for the in-memory default.
# A factory may return a callable instead, called once per timed blend to make a fresh
# source (for sources that are consumed by one blend). Other modules add entries here.
SOURCES = {"memory": lambda engine, chunks, args: None}

# Chunk store sources (cacheblend_ext.store / pipeline): the reused KV streamed layer by
# layer from the store's CPU tier ("ram"), its files ("disk", read cold) or its remote
# tier ("redis", nothing local), pipelined behind the recompute, or loaded on demand with a
# wait per layer ("ram-sync", "disk-sync", "redis-sync"); "disk-mac" and "redis-mac" (and
# their "-sync" variants) add the keyed MAC, verified as each layer loads
# (`--source redis,redis-mac` gives the MAC's cost as paired per-round ratios).
from bench.load import e2e_sources  # noqa: E402

SOURCES.update(e2e_sources())


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="smollm2-135m-instruct, random-7b (Mistral-7B shape, random bf16) or a local HF dir")
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--ratios", default="0,5,10,15,20,30,100", help="CacheBlend recompute ratios in percent")
    parser.add_argument("--scheme", default="default", choices=["default", "published"],
                        help="BlendConfig() defaults, or the published CacheBlend scheme (K deviation at layer 1)")
    parser.add_argument("--source", default="memory",
                        help=f"reused-KV layer source, or a comma-separated list ({', '.join(SOURCES)})")
    parser.add_argument("--no-baselines", action="store_true",
                        help="time only the CacheBlend rows (more rounds for comparing sources; the "
                             "'x full prefill' column is then relative to the first row)")
    parser.add_argument("--redis-url", default=None,
                        help="Redis for --source redis (default: a private redis-server on 127.0.0.1 for the run)")
    parser.add_argument("--cuda-graph", default="off", choices=["off", "on", "both"],
                        help="CUDA only: replay the CacheBlend rows' selective layers from CUDA graphs (on), or "
                             "time each row without and with them (both)")
    parser.add_argument("--cpu-threads", default="auto",
                        help="the engine's CPU thread policy: auto (default), torch (torch's setting) or a count")
    parser.add_argument("--profile", action="store_true",
                        help="also a per-step breakdown of every CacheBlend row (blend(profile=True), medians) and, "
                             "on the CPU, of its operations by kind beside full prefill's")
    parser.add_argument("--sizes", default=None,
                        help="a size sweep instead: requests of these many tokens (e.g. 500,1000,2000,4000,8000), "
                             "chunks of --chunk-tokens; TTFT / full prefill beside the compute fraction at each "
                             "--ratios, a table and a PNG (--plot)")
    parser.add_argument("--plot", default=None, help="PNG of the size sweep (default: next to --json)")


def random_7b(device, dtype):
    """A Mistral-7B-shaped model (32 layers, 4096 hidden, 32 q / 8 kv heads) with random weights."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                        rope_theta=10000.0, sliding_window=None, bos_token_id=1, eos_token_id=2)
    cfg._name_or_path = "random-7b"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def run(args) -> dict:
    with torch.inference_mode():
        return _run(args)


def make_request(engine, chunk_sizes: list, query_tokens: int, seed: int = 0):
    """A random RAG request: a prefix (BOS + 7 tokens), chunks of ``chunk_sizes`` tokens
    (encoded), a query. Returns ``(prefix, chunk_ids, chunks, query)``."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    prefix = torch.tensor(engine.bos_ids() + torch.randint(100, vocab, (7,), generator=g).tolist())
    chunk_ids = [torch.randint(100, vocab, (t,), generator=g) for t in chunk_sizes]
    query = torch.randint(100, vocab, (query_tokens,), generator=g)
    chunks = engine.encode_chunks(chunk_ids, context=engine.chunk_context(prefix))
    return prefix, chunk_ids, chunks, query


def time_methods(methods: list, device: str, iters: int) -> dict:
    """``{name: {median_ms, min_ms, max_ms, iters[, samples_ms]}}`` of each ``(name, ratio,
    fn)``: CUDA events per method on a GPU; on the CPU round-robin over the methods, in
    reverse order every other round, so that load from other processes and a drift within
    a round favour no method (samples kept for paired ratios, and
    each call's ``BlendResult.timings`` as ``results``)."""
    timings = {}
    if device.startswith("cuda"):
        for name, _, fn in methods:
            timings[name] = common.time_fn(fn, device, 0, iters, flush_l2=False)
            torch.cuda.empty_cache()
        return timings
    samples = {name: [] for name, _, _ in methods}
    results = {name: [] for name, _, _ in methods}
    for i in range(iters):
        common.progress(f"round {i + 1}/{iters}")
        for name, _, fn in (methods if i % 2 == 0 else methods[::-1]):
            t0 = time.perf_counter()
            res = fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
            results[name].append(dict(getattr(res, "timings", {})))
    for name, xs in samples.items():
        timings[name] = {"median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs), "iters": iters,
                         "samples_ms": xs, "results": results[name]}
    return timings


def graph_modes(args) -> list[bool]:
    """Whether each CacheBlend row runs eagerly (False) and / or from CUDA graphs (True)."""
    mode = getattr(args, "cuda_graph", "off")
    if mode != "off" and not args.device.startswith("cuda"):
        raise SystemExit(f"--cuda-graph {mode} needs --device cuda (CUDA graphs), got --device {args.device}")
    return {"off": [False], "on": [True], "both": [False, True]}[mode]


def _run(args) -> dict:
    from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
    from cacheblend_ext.blend.models import load_model
    from cacheblend_ext.blend.step import CUDAGraphStep

    from cacheblend_ext.threads import parse_cpu_threads

    graphs, threads_policy = graph_modes(args), parse_cpu_threads(args.cpu_threads, "--cpu-threads")
    dtype = common.resolve_dtype(args)
    gpu = args.device.startswith("cuda")
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    iters = args.iters if args.iters is not None else (10 if gpu else 5)
    if args.model == "random-7b":
        model, tok = random_7b(args.device, dtype), None
    else:
        model, tok = load_model(args.model, dtype=dtype, device=args.device)
    def config(r):
        return BlendConfig(recompute_ratio=r) if args.scheme == "default" else BlendConfig.published(r)

    engine = BlendEngine(model, tok, config(0.15), cpu_threads=threads_policy)
    common.progress(f"kernels: {common.engine_op_backends()}")

    if args.sizes:
        from bench.sweep import run_sweep

        return run_sweep(args, engine, config, warmup, iters)
    common.progress(f"encoding {args.chunks} chunks x {args.chunk_tokens} tokens")
    prefix, chunk_ids, chunks, query = make_request(engine, [args.chunk_tokens] * args.chunks, args.query_tokens)
    first = engine.encode_prefix([prefix, chunk_ids[0]])  # exact-prefix KV for prefix caching
    segments = [prefix, *chunks, query]
    n = prefix.numel() + sum(c.numel() for c in chunk_ids) + query.numel()
    source_names = [x.strip() for x in args.source.split(",") if x.strip()]
    unknown = [x for x in source_names if x not in SOURCES]
    if unknown or not source_names:
        raise SystemExit(f"unknown --source {args.source!r} (known: {', '.join(SOURCES)})")
    made = {name: SOURCES[name](engine, chunks, args) for name in source_names}

    def source(name):
        return made[name]() if callable(made[name]) else made[name]

    # Prefix caching twice: Hugging Face continuing from the cached prefix (its SDPA then
    # takes an explicit-mask path), and the engine's own kernels with the prefix KV reused
    # and every later token forced (same math, same attention kernel as CacheBlend).
    prefix_segments = [first, *chunk_ids[1:], query]
    methods = [("full prefill", 1.0, lambda: engine.full_prefill(segments)),
               ("prefix caching (chunk 1 reused), HF", None,
                lambda: engine.full_prefill(segments, reuse_prefix=first)),
               ("prefix caching (chunk 1 reused), engine", None,
                lambda: engine.blend(prefix_segments, config(0.0)))]
    if args.no_baselines:
        methods = []
    blend_rows = []  # the CacheBlend rows (their functions take blend's keyword arguments)
    graph_rows = {}  # name of a row run from CUDA graphs -> (its CUDAGraphStep, ratio, source, eager row name)
    for r in [float(x) / 100 for x in args.ratios.split(",") if x.strip()]:
        cfg = config(r)
        for src in source_names:
            for graph in graphs:
                base = "full KV reuse" if r == 0 else f"CacheBlend {r:.0%}"
                tags = [src] if len(source_names) > 1 else []
                eager_name = base + (f" [{', '.join(tags)}]" if tags else "")
                name = f"{base} [{', '.join(tags + ['graph'])}]" if graph else eager_name
                step = CUDAGraphStep(engine.device) if graph else None
                if graph:
                    graph_rows[name] = (step, r, src, eager_name)
                methods.append((name, r, lambda cfg=cfg, src=src, step=step, **kw:
                                engine.blend(segments, cfg, source=source(src), step=step, **kw)))
                blend_rows.append(name)

    table = common.Table(
        f"TTFT, {args.model} ({dtype}) on {common.device_name(args.device)}: {args.chunks} x {args.chunk_tokens}-token "
        f"chunks + query = {n} tokens, reused KV from {', '.join(source_names)}"
        + (" (no baselines: 'x full prefill' is relative to the first row)" if args.no_baselines else ""),
        ["method", "recomputed", "TTFT ms", "x full prefill", "speed-up", "min ms", "x full (min)"])
    recomputed, compute, flops, first_tokens = {}, {}, {}, {}
    for name, ratio, fn in methods:
        common.progress(f"{name}: warm-up")
        res = fn()
        recomputed[name] = res.recomputed_fraction() if ratio is not None else (n - first.num_tokens) / n
        compute[name] = res.compute_fraction() if hasattr(res, "compute_fraction") else None
        flops[name] = res.flop_fraction(engine.model.config) if hasattr(res, "flop_fraction") else None
        for _ in range(warmup - 1):
            res = fn()
        first_tokens[name] = res.logits.float().cpu()  # of the last warm-up (graph rows: replayed, not captured)
    graph_check = check_graph_rows(engine, segments, config, source, graph_rows, first_tokens)
    timings = time_methods(methods, args.device, iters)
    rows, base, base_min = [], None, None
    for name, ratio, fn in methods:
        t = timings[name]
        recomputed_n = recomputed[name]
        base = base or t["median_ms"]
        rows.append({"method": name, "ratio": ratio, "recomputed": recomputed_n, "compute_fraction": compute[name],
                     "flop_fraction": flops[name], **t,
                     "vs_full": t["median_ms"] / base, "speedup": base / t["median_ms"]})
        base_min = base_min or t["min_ms"]
        table.add(name, recomputed_n, t["median_ms"], t["median_ms"] / base, base / t["median_ms"], t["min_ms"],
                  t["min_ms"] / base_min)
    print(table.render())
    print("compute fraction (token-layers over full prefill's, the probe's included): "
          + ", ".join(f"{name} {c:.3f}" for name, c in compute.items() if c is not None))
    print("FLOP fraction (the same weighted by matrix FLOPs; attention grows with a row's position): "
          + ", ".join(f"{name} {c:.3f}" for name, c in flops.items() if c is not None))
    paired = paired_ratios(timings, source_names)
    for name, p in paired.items():
       print(f"{name}: median per-round ratio {p['median']:.3f} (95% interval {p['ci95'][0]:.3f} to "
              f"{p['ci95'][1]:.3f}; min {p['min']:.3f}, max {p['max']:.3f}, {p['rounds']} rounds)")
    for name, c in graph_check.items():
        eager = timings.get(c["eager_row"])
        if eager is not None:
            c["graph_over_eager"] = timings[name]["median_ms"] / eager["median_ms"]
        print(f"{name}: {c['captures']} layer graphs, same first token as eager: {c['same_token']}, "
              f"max |logit diff| {c['max_abs_logit_diff']:.3g}"
              + (f", TTFT graph / eager {c['graph_over_eager']:.3f}" if "graph_over_eager" in c else ""))
    loads = {}
    for name, m in made.items():  # store sources: load time and how much of it was hidden
        load = m.summary() if hasattr(m, "summary") else None
        if hasattr(m, "close"):
            m.close()
        if load:
            loads[name] = load
            print(f"KV from {load['source']} ({'pipelined' if load['pipelined'] else 'loaded per layer'}): load "
                  f"{load['load_ms']:.1f} ms per blend, exposed {load['exposed_ms']:.1f} ms, "
                  f"hidden {load['hidden_fraction']:.0%} (medians over {load['blends']} blends)")
    load = loads.get(source_names[0]) if len(source_names) == 1 else loads
    profile = None
    if args.profile:
        from bench.profile_ops import profile_rows

        profile = profile_rows([(name, fn) for name, _, fn in methods if name in blend_rows],
                               methods[0] if not args.no_baselines else None, iters, args.device)
    return {"command": COMMAND, "load": load, "sources": source_names, "profile": profile,
            "environment": common.environment(args.device), "kernels": common.engine_op_backends(),
            "model": args.model, "dtype": str(dtype), "tokens": n, "warmup": warmup, "iters": iters,
            "table": table.as_dict(), "rows": rows, "paired_ratios": paired,
            "cuda_graph": getattr(args, "cuda_graph", "off"), "graph_check": graph_check}


def check_graph_rows(engine, segments, config, source, graph_rows: dict, first_tokens: dict) -> dict:
    """For each row run from CUDA graphs: its first-token logits (of its last warm-up blend)
    against those of an eager blend of the same request, ratio and source, and how
    many layer graphs it captured and replayed."""
    out = {}
    for name, (step, ratio, src, eager_row) in graph_rows.items():
        if eager_row in first_tokens:  # --cuda-graph both: the eager row's own warm-up
            ref = first_tokens[eager_row]
        else:
            ref = engine.blend(segments, config(ratio), source=source(src)).logits.float().cpu()
        got = first_tokens[name]
        out[name] = {"eager_row": eager_row, "captures": step.captures, "replays": step.replays,
                     "same_token": int(got.argmax()) == int(ref.argmax()),
                     "max_abs_logit_diff": float((got - ref).abs().max())}
    return out


def paired_ratios(timings: dict, source_names: list) -> dict:
    """With several sources: for each row of a non-first source, the median over rounds of
    its time divided by the first source's time in the same round (robust to load that
    drifts between rounds), with a 95% bootstrap interval of that median (``ci95``)."""
    if len(source_names) < 2:
        return {}
    first = f"[{source_names[0]}]"
    out = {}
    for name, t in timings.items():
        if not name.endswith("]") or name.endswith(first) or "samples_ms" not in t:
            continue
        base = timings.get(name[: name.rindex("[")] + first)
        if base is None:
            continue
        ratios = [a / b for a, b in zip(t["samples_ms"], base["samples_ms"])]
        out[f"{name} / {first}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                    "rounds": len(ratios), "ci95": bootstrap_median_ci(ratios)}
    return out


def bootstrap_median_ci(xs: list, resamples: int = 5000, seed: int = 0) -> list:
    """95% percentile-bootstrap interval of the median of ``xs`` (seeded: reproducible)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def paired_ratios_of(path: str) -> dict:
    """:func:`paired_ratios` of a JSON file this command wrote (for files written before
    the interval was added): ``python -c "from bench.e2e import paired_ratios_of;
    print(paired_ratios_of('result.json'))"``."""
    import json

    with open(path) as f:
        result = json.load(f)
    timings = {row["method"]: row for row in result["rows"]}
    return paired_ratios(timings, result["sources"])
