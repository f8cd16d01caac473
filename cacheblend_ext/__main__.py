"""``python -m cacheblend_ext demo``: answer a small RAG request with full prefill, full KV
reuse and CacheBlend on the bundled SmolLM2-135M-Instruct, with each answer's TTFT."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .threads import parse_cpu_threads


def _demo(args) -> int:
    from .blend.engine import BlendConfig, BlendEngine
    from .blend.models import load_model
    from .testing.rag_data import chat_segments, first_clause, make_samples

    threads_policy = parse_cpu_threads(args.cpu_threads, "--cpu-threads")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    print(f"loading {args.model} ({args.dtype}, {args.device}) ...", flush=True)
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    engine = BlendEngine(model, tok, BlendConfig(recompute_ratio=args.ratio),
                         cpu_threads=threads_policy)
    sample = make_samples(1, num_chunks=args.chunks, chunk_words=args.chunk_words, seed=args.seed,
                          two_hop_fraction=1.0)[0]
    prefix, texts, query = chat_segments(tok, sample)

    def show(i, n, chunk):
        print(f"\r  encoding chunks: {i}/{n} ({chunk.num_tokens} tokens, key {chunk.key[:12]})", end="", flush=True)

    t0 = time.perf_counter()
    chunks = engine.encode_chunks(texts, progress=show, context=engine.chunk_context(prefix))
    print(f"\n  encoded {len(chunks)} chunks once in {time.perf_counter() - t0:.2f} s "
          f"({sum(c.num_tokens for c in chunks)} tokens, {sum(c.nbytes for c in chunks) / 2**20:.1f} MiB of KV)")
    segments = [prefix, *chunks, query]
    engine.blend(segments, BlendConfig(recompute_ratio=0.0))  # warm-up

    def answer(result):
        tokens = engine.generate(result, args.max_new_tokens)
        return first_clause(tok.decode(tokens, skip_special_tokens=True))

    runs = [("full prefill", lambda: engine.full_prefill(segments)),
            ("full KV reuse", lambda: engine.blend(segments, BlendConfig(recompute_ratio=0.0))),
            (f"CacheBlend {args.ratio:.0%}", lambda: engine.blend(segments))]
    print(f"\nquestion: {sample.question}\ngold answer: {sample.answer}   "
          f"(the two facts sit in different chunks; {len(chunks)} chunks + query = "
          f"{engine.tokenize(prefix).numel() + sum(c.num_tokens for c in chunks) + engine.tokenize(query).numel()} tokens)\n")
    rows, base, threads = [], None, []
    for name, fn in runs:
        result = fn()
        ttft = result.timings["total_ms"] / 1e3
        base = base or ttft
        rows.append((name, f"{sample.stem} {answer(result)}", ttft, base / ttft))
        threads.append(result.timings["threads"])
    w = max(len(r[0]) for r in rows)
    print(f"{'method':<{w}}  {'TTFT':>8}  {'speed-up':>8}  answer")
    for name, text, ttft, speed in rows:
        print(f"{name:<{w}}  {ttft:>7.3f}s  {speed:>7.2f}x  {text}")
    if args.device == "cpu":
        print(f"(CPU threads: {', '.join(map(str, threads))}; torch's default {torch.get_num_threads()}, "
              f"--cpu-threads {args.cpu_threads})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cacheblend_ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="blend a small RAG request on the bundled model")
    d.add_argument("--model", default="smollm2-135m-instruct", help="bundled model name or a local HF model dir")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--ratio", type=float, default=0.15, help="CacheBlend recompute ratio")
    d.add_argument("--chunks", type=int, default=6)
    d.add_argument("--chunk-words", type=int, default=200)
    d.add_argument("--seed", type=int, default=3)
    d.add_argument("--max-new-tokens", type=int, default=12)
    d.add_argument("--cpu-threads", default="auto",
                   help="auto (default: as many as the cores other processes leave free), torch (torch's own "
                        "setting) or a count")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
