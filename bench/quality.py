"""Answer quality per recomputed token: blending schemes against full prefill and against
the published CacheBlend scheme, on a generated multi-document QA set of varied shape.

Requests (``cacheblend_ext.testing.rag_data.make_varied_samples``): 3 to 8 chunks of about 64 to
400 tokens of essay text with planted facts, one-hop ("Who leads Project X?") and two-hop
questions (the leader and the birthplace sit in different chunks), answer stems that keep
the small model's answers extractive, several seeds.

For every request, full prefill gives the reference: its greedy answer and its greedy
continuation of ``--kl-tokens`` tokens with their distributions. Each scheme, at each
recompute budget, is scored by
- fidelity to full prefill: greedy-answer agreement, KL(full || scheme) of the first
  token's distribution and the mean over the first ``--kl-tokens`` tokens (teacher-forced
  along full prefill's continuation);
- F1 / exact match of its answer against the gold answer;
- what it actually computed: the share of a full prefill's token-layers (forced tokens
  and every extra token included) and the share of tokens carried to the last layer;
- the time its selection took, the probe pass included (share of the blend).

Every scheme runs under the compute budget of the published scheme at the same ratio
(``BlendConfig.budget = "compute"``), so curves compare at equal compute. Differences
against full prefill and against the published scheme come with paired bootstrap 95%
intervals over requests. ``hindsight`` is a yardstick, not a usable scheme: it ranks
tokens by their true KV error over all layers, which needs the full prefill.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass

import torch

from bench import common

COMMAND = "quality"
HELP = "answer quality and fidelity to full prefill of blending schemes across recompute budgets"


@dataclass(frozen=True)
class Scheme:
    """A blending scheme of the harness: a config for a ratio and how chunks are encoded."""

    description: str
    changes: tuple = ()  # BlendConfig fields changed from the published scheme
    context: str = "bos"  # chunk encoding context: "bos", "prefix" (the request's system prefix) or "none"
    hindsight: bool = False

    def config(self, ratio: float):
        from cacheblend_ext.blend.engine import BlendConfig

        return BlendConfig.published(ratio).replace(budget="compute", **dict(self.changes))


SCHEMES = {
    "published": Scheme("K deviation at check layer 1, global top-k (CacheBlend paper)"),
    "v": Scheme("V deviation", (("deviation", "v"),)),
    "kv": Scheme("K+V deviation", (("deviation", "kv"),)),
    "impact": Scheme("K deviation x query attention mass", (("selection", "impact"),)),
    "impact-v": Scheme("V deviation x query attention mass", (("deviation", "v"), ("selection", "impact"))),
    "boundary4": Scheme("first 4 tokens of each chunk first, inside the budget", (("boundary_tokens", 4),)),
    "per-chunk": Scheme("per-chunk quotas", (("quota", "per_chunk"),)),
    "check3": Scheme("first check layer 3 (layers 0-2 full), equal compute", (("check_layers", (3,)),)),
    "gradual": Scheme("gradual filtering at layers 1-4, equal compute", (("check_layers", (1, 2, 3, 4)),)),
    "fresh": Scheme("fresh_check_kv", (("fresh_check_kv", True),)),
    "ctx-prefix": Scheme("chunks encoded after the request's system prefix", context="prefix"),
    "ctx-none": Scheme("chunks encoded alone (no BOS)", context="none"),
    "probe": Scheme("probe selection (the query's attention over reused KV) at check layer 1",
                    (("selection", "probe"),)),
    "probe-c0-16": Scheme("probe selection at check layer 0, 16 probe tokens",
                          (("selection", "probe"), ("check_layers", (0,)), ("probe_tokens", 16))),
    "probe-c0-prefix": Scheme("probe selection at check layer 0, chunks encoded after the request's prefix",
                              (("selection", "probe"), ("check_layers", (0,)), ("chunk_prefix", "prefix")),
                              context="prefix"),
    "deviation-c0-prefix": Scheme("K deviation at check layer 0, chunks encoded after the request's prefix",
                                  (("check_layers", (0,)), ("chunk_prefix", "prefix")), context="prefix"),
    "hindsight": Scheme("yardstick: true KV error over all layers (needs full prefill)", hindsight=True),
    **{f"probe-layers-{p}": Scheme(f"the default with a probe of the first {p} layers",
                                   (("selection", "probe"), ("check_layers", (0,)), ("probe_layers", p)))
       for p in (2, 4, 6, 8, 12, 16)},
}
DEFAULT_SCHEME = "default"


def _default_scheme() -> Scheme:
    """The engine's default ``BlendConfig`` (what users get), chunks encoded as it prescribes."""
    return Scheme("BlendConfig() defaults: probe selection at check layer 0, chunks encoded after BOS")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="bundled model name or local HF model dir")
    parser.add_argument("--seeds", default="0,1", help="data seeds (comma separated)")
    parser.add_argument("--samples", type=int, default=30, help="requests per seed")
    parser.add_argument("--chunks", default="3,8", help="min,max chunks per request")
    parser.add_argument("--chunk-words", default="52,320", help="min,max filler words per chunk (~64-400 tokens)")
    parser.add_argument("--budgets", default="5,10,15,20,30", help="recompute budgets in percent (the curves)")
    parser.add_argument("--curve-schemes", default="published,default,probe-c0-prefix",
                        help=f"schemes run at every budget; known: {DEFAULT_SCHEME}, {', '.join(SCHEMES)}")
    parser.add_argument("--point-schemes", default="hindsight,deviation-c0-prefix",
                        help="schemes run at --point-budget only")
    parser.add_argument("--point-budget", type=float, default=15.0, help="budget (percent) of --point-schemes")
    parser.add_argument("--kl-tokens", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=10)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    parser.add_argument("--out", default="bench_out/quality", help="directory for quality.json and quality.png")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the published scheme and full KV reuse (a run to be merged with one that has them)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="run nothing: merge the quality.json files of runs over the same requests (same "
                             "seeds, samples and shape settings) into one table, plot and JSON in --out")
    parser.add_argument("--rename", default="", help="with --merge: old=new[,old=new] scheme names")


# ---------------------------------------------------------------- scoring helpers


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of the softmax distributions, per row."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _answer_prefix(tok, tokens, eos, max_tokens):
    """The greedy answer inside ``tokens`` (a greedy continuation): up to the end of the
    first clause (newline, sentence end), EOS or ``max_tokens``. Returns ``(ids, stopped_by_eos)``."""
    out = []
    for i, t in enumerate(tokens[:max_tokens]):
        if t in eos:
            return out, True
        out.append(t)
        text = tok.decode(out)
        if "\n" in text or any(c in text for c in ".!?;"):
            break
    return out, False


def _greedy_answer(engine, tok, logits, cache, pos, eos, max_tokens):
    """Greedy decoding with the answer's stop rule (see :func:`_answer_prefix`)."""
    from cacheblend_ext.blend.hf import out_cache

    out = []
    for i in range(max_tokens):
        t = int(logits.argmax())
        if t in eos:
            break
        out.append(t)
        text = tok.decode(out)
        if "\n" in text or any(c in text for c in ".!?;") or i == max_tokens - 1:
            break
        res = engine.forward(torch.tensor([t]), torch.tensor([pos]), cache)
        cache = out_cache(res)
        logits = res.logits[0, -1].float()
        pos += 1
    return out


def _cache_copy(model, result):
    """A cache over the result's KV that decoding can extend without touching the result."""
    from cacheblend_ext.blend.hf import make_dynamic_cache

    layers = result.cache.layers
    return make_dynamic_cache(model, [layer.keys for layer in layers], [layer.values for layer in layers])


def _teacher_forced_logits(engine, result, tokens, pos):
    """The first-token logits, then the logits after each of ``tokens[:-1]`` fed in turn."""
    feed = torch.tensor(tokens[:-1])
    if feed.numel() == 0:
        return result.logits[None]
    res = engine.forward(feed, torch.arange(pos, pos + feed.numel()), _cache_copy(engine.model, result),
                          logits_to_keep=0)
    return torch.cat([result.logits[None], res.logits[0].float()])


def _hindsight_scores(engine, full, chunks, spans):
    """``[N]`` per-token KV error of the reused chunk KV against full prefill's, summed over
    layers after normalising each layer (and K, V separately) by its mean over chunk tokens."""
    from cacheblend_ext import ops

    n = full.num_tokens
    rope = engine.rope(n + 1)
    src = torch.cat([c.positions for c in chunks]).to(engine.device)
    dst = torch.cat([torch.arange(a, b) for a, b in spans]).to(engine.device)
    scores = torch.zeros(n, dtype=torch.float64)
    h, d = engine.num_kv_heads, engine.head_dim
    for l, layer in enumerate(full.cache.layers):
        k = torch.zeros(n, h, d, device=engine.device, dtype=engine.dtype)
        v = torch.zeros_like(k)
        ops.fused_kv_concat([c.kv[l][None] for c in chunks], src, dst, dst, rope.cos_sin_cache, rope.is_neox, [k], [v])
        for mine, ref in ((k, layer.keys), (v, layer.values)):
            err = ((ref[0, :, :n].transpose(0, 1).float() - mine.float()) ** 2).sum((1, 2)).double().cpu()
            scores[dst.cpu()] += err[dst.cpu()] / err[dst.cpu()].mean().clamp_min(1e-30)
    return scores.float()


# ---------------------------------------------------------------- statistics


def _bootstrap_mean_ci(diffs: list[float], resamples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean of paired differences."""
    if not diffs:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def _bootstrap_ratio_ci(a: list[float], b: list[float], resamples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of ``mean(a) / mean(b)`` over paired resamples."""
    rng = random.Random(seed)
    n = len(a)
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        den = sum(b[i] for i in idx)
        ratios.append(sum(a[i] for i in idx) / den if den > 0 else float("inf"))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[min(resamples - 1, int(0.975 * resamples))]


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------- the run


def run(args) -> dict:
    if args.merge:
        return _merge(args)
    with torch.inference_mode():
        return _run(args)


def _merge(args) -> dict:
    """One report over several runs' records (paired by request: seed and index)."""
    t_start = time.perf_counter()
    rename = dict(pair.split("=", 1) for pair in args.rename.split(",") if pair.strip())
    records, runs, seen = {}, [], set()
    for path in args.merge:
        with open(path) as f:
            data = json.load(f)
        # a name (after --rename) that this harness knows is described by its current definition
        schemes = {rename.get(name, name): Scheme(s["description"], tuple(s["changes"].items()), s["context"])
                   for name, s in data["schemes"].items()}
        schemes.update({name: _schemes(name)[name] for name in schemes if name in SCHEMES or name == DEFAULT_SCHEME})
        for rec in data["requests"]:
            key = (rec["seed"], rec["index"])
            runs_of = {f"{rename.get(k.split('@')[0], k.split('@')[0])}@{k.split('@')[1]}": v
                       for k, v in rec["runs"].items()}
            if key not in records:
                records[key] = {**rec, "runs": {}}
            elif records[key]["full_answer"] != rec["full_answer"] or records[key]["tokens"] != rec["tokens"]:
                raise SystemExit(f"{path}: request {key} differs from the other runs' (not the same request set)")
            records[key]["runs"].update(runs_of)
        for row in data["rows"]:
            name = rename.get(row["scheme"], row["scheme"])
            if (name, row["budget"]) not in seen:
                seen.add((name, row["budget"]))
                runs.append((name, schemes.get(name, Scheme(row["description"])), row["budget"]))
    complete = [r for r in records.values() if all(f"{n}@{b:g}" in r["runs"] for n, _, b in runs)]
    if len(complete) != len(records):
        raise SystemExit(f"only {len(complete)} of {len(records)} requests have every scheme's run")
    return _report(args, list(records.values()), runs, t_start, merged_from=args.merge)


def _parse_pair(text: str, name: str) -> tuple[int, int]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 2:
        raise SystemExit(f"{name} must be 'min,max', got {text!r}")
    return parts[0], parts[1]


def _schemes(names: str) -> dict[str, Scheme]:
    out = {}
    for name in (x.strip() for x in names.split(",") if x.strip()):
        if name == DEFAULT_SCHEME:
            out[name] = _default_scheme()
        elif name in SCHEMES:
            out[name] = SCHEMES[name]
        else:
            raise SystemExit(f"unknown scheme {name!r}; known: {DEFAULT_SCHEME}, {', '.join(SCHEMES)}")
    return out


def _run(args) -> dict:
    from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
    from cacheblend_ext.blend.models import load_model
    from cacheblend_ext.testing.rag_data import chat_segments, exact_match, f1_score, first_clause, make_varied_samples

    dtype = common.resolve_dtype(args)
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    engine = BlendEngine(model, tok)
    common.progress(f"kernels: {common.engine_op_backends()}")
    budgets = [float(b) / 100 for b in args.budgets.split(",") if b.strip()]
    point = args.point_budget / 100
    runs = [(name, s, r) for name, s in _schemes(args.curve_schemes).items() for r in budgets]
    runs += [(name, s, point) for name, s in _schemes(args.point_schemes).items()]
    if not args.no_baselines:
        runs += [("full KV reuse", SCHEMES["published"], 0.0)]
    if not args.no_baselines and ("published" not in {name for name, _, _ in runs if _ != 0.0} or point not in budgets):
        runs += [("published", SCHEMES["published"], r) for r in sorted(set(budgets + [point]))
                 if ("published", r) not in {(n, rr) for n, _, rr in runs}]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    chunk_range = _parse_pair(args.chunks, "--chunks")
    word_range = _parse_pair(args.chunk_words, "--chunk-words")
    samples = [(seed, i, s) for seed in seeds
               for i, s in enumerate(make_varied_samples(args.samples, seed, chunk_range, word_range))]

    eos = {tok.eos_token_id, getattr(model.config, "eos_token_id", None)} - {None}
    records = []
    t_start = time.perf_counter()
    for count, (seed, index, sample) in enumerate(samples):
        prefix, texts, query = chat_segments(tok, sample)
        full = engine.full_prefill([prefix, *texts, query])
        n = full.num_tokens
        full_cache = _cache_copy(model, full)
        ref_tokens, ref_logits = engine.generate(full, args.kl_tokens, stop_at_eos=False, return_logits=True)
        full.cache = full_cache
        answer_ids, by_eos = _answer_prefix(tok, ref_tokens, eos, min(args.answer_tokens, args.kl_tokens))
        full_answer = first_clause(tok.decode(answer_ids, skip_special_tokens=True))
        rec = {"seed": seed, "index": index, "kind": sample.kind, "chunks": len(texts), "tokens": n,
               "question": sample.question, "gold": sample.answer, "full_answer": full_answer,
               "full_f1": f1_score(full_answer, sample.answer), "full_em": exact_match(full_answer, sample.answer),
               "runs": {}}
        contexts = {"bos": engine.bos_ids(), "none": [], "prefix": engine.tokenize(prefix).tolist()}
        encoded, hindsight = {}, None
        for name, scheme, r in runs:
            if scheme.context not in encoded:
                encoded[scheme.context] = engine.encode_chunks(texts, context=contexts[scheme.context])
            chunks = encoded[scheme.context]
            segments = [prefix, *chunks, query]
            scores = None
            if scheme.hindsight:
                if hindsight is None:
                    hindsight = _hindsight_scores(engine, full, chunks, engine.plan_request(segments).spans)
                scores = hindsight
            cfg = BlendConfig(recompute_ratio=r) if name == DEFAULT_SCHEME else scheme.config(r)
            res = engine.blend(segments, cfg, rank_scores=scores)
            logits = _teacher_forced_logits(engine, res, ref_tokens, n)
            kl = _kl_rows(ref_logits, logits)
            greedy = logits.argmax(-1).tolist()
            same = greedy[:len(answer_ids)] == answer_ids and (not by_eos or greedy[len(answer_ids)] in eos)
            if same:
                answer = full_answer
            else:
                ids = _greedy_answer(engine, tok, res.logits, _cache_copy(model, res), n, eos, args.answer_tokens)
                answer = first_clause(tok.decode(ids, skip_special_tokens=True))
            rec["runs"][f"{name}@{r:g}"] = {
                "answer": answer, "f1": f1_score(answer, sample.answer), "em": exact_match(answer, sample.answer),
                "agree": float(normalize(answer) == normalize(full_answer)), "kl1": float(kl[0]),
                "kl16": float(kl.mean()), "compute": res.compute_fraction(), "last_layer": res.recomputed_fraction(),
                "select_ms": res.timings.get("select_ms", 0.0) + res.timings.get("probe_ms", 0.0),
                "blend_ms": res.timings["total_ms"]}
        records.append(rec)
        common.progress(f"request {count + 1}/{len(samples)} (seed {seed}, {len(texts)} chunks, {n} tokens, "
                        f"{time.perf_counter() - t_start:.0f} s): gold {sample.answer!r}, full {full_answer!r}")

    return _report(args, records, runs, t_start, kernels=common.engine_op_backends())


def _report(args, records, runs, t_start, **extra) -> dict:
    from cacheblend_ext.blend.engine import BlendConfig

    rows = _summarise(records, runs, args.bootstrap)
    table = _table(rows, len(records))
    print(table.render())
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "quality.png")
    _plot(rows, records, png, table.title)
    result = {"command": COMMAND, "environment": common.environment(args.device), **extra,
              "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
              "schemes": {name: {"description": s.description, "changes": dict(s.changes), "context": s.context}
                          for name, s, _ in runs},
              "default_config": {k: (list(v) if isinstance(v, tuple) else v)
                                 for k, v in BlendConfig().__dict__.items()},
              "full_prefill": {"f1": _mean([r["full_f1"] for r in records]),
                               "em": _mean([r["full_em"] for r in records])},
              "table": table.as_dict(), "rows": rows, "requests": records,
              "seconds": time.perf_counter() - t_start}
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {png} and {os.path.join(args.out, 'quality.json')}")
    return result


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def _summarise(records, runs, resamples) -> list[dict]:
    rows = []
    for name, scheme, r in runs:
        key = f"{name}@{r:g}"
        xs = [rec["runs"][key] for rec in records]
        pub_key = f"published@{r:g}" if r > 0 else key
        pub = [rec["runs"].get(pub_key) for rec in records]
        if any(p is None for p in pub):  # a --no-baselines run: no comparison with the published scheme
            pub = [{m: float("nan") for m in ("f1", "agree", "kl1", "kl16")} for _ in records]
        full_f1 = [rec["full_f1"] for rec in records]
        row = {"scheme": name, "budget": r, "compute": _mean([x["compute"] for x in xs]),
               "last_layer": _mean([x["last_layer"] for x in xs])}
        for metric in ("f1", "em", "agree", "kl1", "kl16"):
            row[metric] = _mean([x[metric] for x in xs])
        row["f1_vs_full"] = row["f1"] - _mean(full_f1)
        row["f1_vs_full_ci"] = _bootstrap_mean_ci([x["f1"] - f for x, f in zip(xs, full_f1)], resamples)
        for metric in ("f1", "agree", "kl1", "kl16"):
            row[f"{metric}_vs_published"] = row[metric] - _mean([p[metric] for p in pub])
            row[f"{metric}_vs_published_ci"] = _bootstrap_mean_ci([x[metric] - p[metric] for x, p in zip(xs, pub)],
                                                                  resamples)
        for metric in ("kl1", "kl16"):
            den = _mean([p[metric] for p in pub])
            row[f"{metric}_x_published"] = row[metric] / den if den > 0 else float("nan")
            row[f"{metric}_x_published_ci"] = _bootstrap_ratio_ci([x[metric] for x in xs], [p[metric] for p in pub],
                                                                  resamples)
        row["select_share"] = _mean([x["select_ms"] / x["blend_ms"] for x in xs])
        row["description"] = scheme.description
        rows.append(row)
    return rows


def _ci(pair) -> str:
    return f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"


def _table(rows, num_requests):
    table = common.Table(
        f"Fidelity and F1 at equal compute on {num_requests} requests (bundled model; intervals: paired bootstrap 95%)",
        ["scheme", "budget", "computed", "last layer", "F1", "F1 - full [95%]", "agree", "agree - pub [95%]",
         "KL 1st", "x pub [95%]", "KL 16", "x pub [95%]", "select+probe %"])
    for r in rows:
        table.add(r["scheme"], f"{r['budget']:.0%}", r["compute"], r["last_layer"], r["f1"], _ci(r["f1_vs_full_ci"]),
                  r["agree"], _ci(r["agree_vs_published_ci"]), r["kl1"],
                  f"{r['kl1_x_published']:.3f} [{r['kl1_x_published_ci'][0]:.2f}, {r['kl1_x_published_ci'][1]:.2f}]",
                  r["kl16"],
                  f"{r['kl16_x_published']:.3f} [{r['kl16_x_published_ci'][0]:.2f}, {r['kl16_x_published_ci'][1]:.2f}]",
                  100 * r["select_share"])
    return table


def _plot(rows, records, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    reuse = next((r for r in rows if r["scheme"] == "full KV reuse"), None)
    panels = (("agree", "greedy-answer agreement with full prefill"), ("kl1", "KL(full || scheme), first token"),
              ("kl16", "mean KL, first 16 tokens"), ("f1", "F1 vs gold"))
    schemes = []
    for r in rows:
        if r["scheme"] not in schemes and r["scheme"] != "full KV reuse":
            schemes.append(r["scheme"])
    for name in schemes:
        pts = sorted((r["compute"], r) for r in rows if r["scheme"] == name)
        single = len(pts) == 1 or reuse is None
        for ax, (key, _) in zip(axes, panels):
            xs = [reuse["compute"]] + [p[0] for p in pts] if not single else [p[0] for p in pts]
            ys = [reuse[key]] + [p[1][key] for p in pts] if not single else [p[1][key] for p in pts]
            ax.plot([100 * x for x in xs], ys, "o" if len(pts) == 1 else "o-", label=name, ms=4 if not single else 6)
    full_f1 = _mean([r["full_f1"] for r in records])
    for ax, (key, name) in zip(axes, panels):
        ax.axhline({"agree": 1.0, "kl1": 0.0, "kl16": 0.0, "f1": full_f1}[key], color="gray", ls=":",
                   label="full prefill")
        ax.set_xlabel("computed: % of full prefill's token-layers")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
