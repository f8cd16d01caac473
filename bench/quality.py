"""Answer quality of CacheBlend vs full prefill and full KV reuse on a generated
multi-document QA set (see ``cacheblend_ext.rag_data``): F1 / exact match against the
gold answers, and fidelity to full prefill (greedy-answer agreement, mean KL of the first
16 output tokens' distributions along full prefill's greedy continuation), for several
recompute ratios, with one check layer and with gradual filtering."""

from __future__ import annotations

import json
import os
import time

import torch

from bench import common

COMMAND = "quality"
HELP = "answer quality (F1/EM, agreement and KL vs full prefill) of CacheBlend across recompute ratios"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="bundled model name or local HF model dir")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=4, help="chunks per request")
    parser.add_argument("--chunk-words", type=int, default=80, help="filler words per chunk (plus planted facts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratios", default="0,5,10,15,20,30,100", help="recompute ratios in percent")
    parser.add_argument("--check-layer", type=int, default=1, help="check layer of the single-check-layer mode")
    parser.add_argument("--gradual-layers", default="1,2,3,4", help="check layers of gradual filtering ('' to skip)")
    parser.add_argument("--deviation", default="k", choices=["k", "v", "kv"])
    parser.add_argument("--fresh-check-kv", action="store_true",
                        help="keep the check layers' fresh K/V for every candidate (BlendConfig.fresh_check_kv)")
    parser.add_argument("--kl-tokens", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=10)
    parser.add_argument("--out", default="bench_out/quality", help="directory for quality.json and quality.png")


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of KL(p || q) of the softmax distributions."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _greedy_answer(engine, tok, logits, cache, pos, max_tokens):
    """Greedy tokens until end of the answer clause (newline, sentence end, EOS)."""
    from cacheblend_ext.engine import _out_cache

    eos = {tok.eos_token_id, getattr(engine.model.config, "eos_token_id", None)}
    out = []
    for i in range(max_tokens):
        t = int(logits.argmax())
        if t in eos:
            break
        out.append(t)
        text = tok.decode(out)
        if "\n" in text or any(c in text for c in ".!?;") or i == max_tokens - 1:
            break
        res = engine._forward(torch.tensor([t]), torch.tensor([pos]), cache)
        cache = _out_cache(res)
        logits = res.logits[0, -1].float()
        pos += 1
    return out


def _teacher_forced_logits(engine, first_logits, kv, tokens, pos):
    """First-token logits plus the logits after feeding ``tokens[:-1]`` on a fresh copy of the cache."""
    from cacheblend_ext.engine import make_dynamic_cache

    cache = make_dynamic_cache(engine.model, [k for k, _ in kv], [v for _, v in kv])
    feed = torch.tensor(tokens[:-1])
    if feed.numel() == 0:
        return first_logits[None]
    res = engine._forward(feed, torch.arange(pos, pos + feed.numel()), cache, logits_to_keep=0)
    return torch.cat([first_logits[None], res.logits[0].float()])


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    full = next(r for r in rows if r["method"] == "full prefill")
    for mode, style in (("single", "o-"), ("gradual", "s--")):
        pts = sorted((r["ratio"] * 100, r) for r in rows if r["mode"] in (mode, "both"))
        if len([p for p in pts if rows and p[1]["mode"] == mode]) == 0:
            continue
        xs = [p[0] for p in pts]
        for ax, key in zip(axes, ("f1", "agreement", "kl")):
            ax.plot(xs, [p[1][key] for p in pts], style, label=f"CacheBlend ({mode} check layer{'s' if mode == 'gradual' else ''})")
    for ax, key, name in zip(axes, ("f1", "agreement", "kl"),
                             ("F1 vs gold", "greedy-answer agreement with full prefill",
                              "mean KL(full || method), first 16 tokens")):
        ax.axhline(full[key], color="gray", ls=":", label="full prefill")
        ax.set_xlabel("recompute ratio (%)  [0 = full KV reuse]")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    with torch.inference_mode():
        return _run(args)


def _run(args) -> dict:
    from cacheblend_ext import _kernels
    from cacheblend_ext.engine import BlendConfig, BlendEngine, make_dynamic_cache
    from cacheblend_ext.models import load_model
    from cacheblend_ext.rag_data import chat_segments, exact_match, f1_score, first_clause, make_samples

    dtype = common.resolve_dtype(args)
    ratios = [float(r) / 100 for r in args.ratios.split(",") if r.strip()]
    gradual = tuple(int(x) for x in args.gradual_layers.split(",") if x.strip())
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    engine = BlendEngine(model, tok, BlendConfig(deviation=args.deviation))
    samples = make_samples(args.samples, args.chunks, args.chunk_words, args.seed)
    common.progress(f"kernels: {_kernels.backends()}")

    configs = []  # (label, mode, ratio, BlendConfig)
    for r in ratios:
        if r in (0.0, 1.0) or not gradual:
            configs.append((f"{r:.0%}", "both" if r in (0.0, 1.0) else "single", r,
                            BlendConfig(recompute_ratio=r, check_layers=(args.check_layer,), deviation=args.deviation,
                                        fresh_check_kv=args.fresh_check_kv)))
        else:
            configs.append((f"{r:.0%} single", "single", r,
                            BlendConfig(recompute_ratio=r, check_layers=(args.check_layer,), deviation=args.deviation,
                                        fresh_check_kv=args.fresh_check_kv)))
            configs.append((f"{r:.0%} gradual", "gradual", r,
                            BlendConfig(recompute_ratio=r, check_layers=gradual, deviation=args.deviation,
                                        fresh_check_kv=args.fresh_check_kv)))

    stats = {"full prefill": []}
    stats.update({c[0]: [] for c in configs})
    records = []
    t_start = time.perf_counter()
    for i, sample in enumerate(samples):
        prefix, texts, query = chat_segments(tok, sample)
        chunks = engine.encode_chunks(texts)
        segments = [prefix, *chunks, query]
        full = engine.full_prefill(segments)
        n = full.num_tokens
        full_kv = [(layer.keys, layer.values) for layer in full.cache.layers]
        full_answer_ids = _greedy_answer(engine, tok, full.logits, full.cache, n, args.answer_tokens)
        # full prefill's greedy continuation of kl_tokens tokens, with its distributions
        full.cache = make_dynamic_cache(model, [k for k, _ in full_kv], [v for _, v in full_kv])
        ref_tokens, ref_logits = engine.generate(full, args.kl_tokens, stop_at_eos=False, return_logits=True)
        full_answer = first_clause(tok.decode(full_answer_ids, skip_special_tokens=True))
        rec = {"question": sample.question, "gold": sample.answer, "kind": sample.kind, "tokens": n,
               "answers": {"full prefill": full_answer}}
        stats["full prefill"].append({"f1": f1_score(full_answer, sample.answer),
                                      "em": exact_match(full_answer, sample.answer), "agreement": 1.0, "kl": 0.0,
                                      "recomputed": 1.0, "ttft_ms": full.timings["total_ms"]})
        for label, mode, r, cfg in configs:
            res = engine.blend(segments, cfg)
            kv = [(layer.keys, layer.values) for layer in res.cache.layers]
            ans_ids = _greedy_answer(engine, tok, res.logits, res.cache, n, args.answer_tokens)
            answer = first_clause(tok.decode(ans_ids, skip_special_tokens=True))
            logits = _teacher_forced_logits(engine, res.logits, kv, ref_tokens, n)
            stats[label].append({
                "f1": f1_score(answer, sample.answer), "em": exact_match(answer, sample.answer),
                "agreement": float(answer.strip().lower() == full_answer.strip().lower()),
                "kl": _kl(ref_logits, logits), "kl_first": _kl(ref_logits[:1], logits[:1]),
                "recomputed": res.recomputed_fraction(), "ttft_ms": res.timings["total_ms"]})
            rec["answers"][label] = answer
        records.append(rec)
        common.progress(f"sample {i + 1}/{len(samples)} ({n} tokens, {time.perf_counter() - t_start:.0f} s): "
                        f"gold {sample.answer!r}, full {full_answer!r}, 0% {rec['answers'].get('0%')!r}")

    def mean(xs, key):
        vals = [x[key] for x in xs if key in x]
        return sum(vals) / len(vals) if vals else float("nan")

    table = common.Table(f"QA quality on {len(samples)} generated requests ({args.chunks} chunks, deviation "
                         f"{args.deviation.upper()}, single check layer {args.check_layer}, gradual {gradual})",
                         ["method", "recomputed", "F1", "EM", "agree w/ full", "KL 16 tok", "KL 1st tok", "TTFT ms"])
    rows = []
    for label in stats:
        xs = stats[label]
        mode = "full" if label == "full prefill" else next(c[1] for c in configs if c[0] == label)
        ratio = 1.0 if label == "full prefill" else next(c[2] for c in configs if c[0] == label)
        row = {"method": label if label == "full prefill" else f"CacheBlend {label}" if ratio > 0 else "full KV reuse (0%)",
               "mode": mode, "ratio": ratio, "recomputed": mean(xs, "recomputed"), "f1": mean(xs, "f1"),
               "em": mean(xs, "em"), "agreement": mean(xs, "agreement"), "kl": mean(xs, "kl"),
               "kl_first": mean(xs, "kl_first") if label != "full prefill" else 0.0, "ttft_ms": mean(xs, "ttft_ms")}
        if label == "full prefill":
            row["method"] = "full prefill"
        rows.append(row)
        table.add(row["method"], row["recomputed"], row["f1"], row["em"], row["agreement"], row["kl"],
                  row["kl_first"], row["ttft_ms"])
    print(table.render())
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "quality.png")
    _plot(rows, png, table.title)
    result = {"command": COMMAND, "environment": common.environment(args.device), "kernels": _kernels.backends(),
              "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
              "table": table.as_dict(), "rows": rows, "samples": records,
              "seconds": time.perf_counter() - t_start}
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {png} and {os.path.join(args.out, 'quality.json')}")
    return result
