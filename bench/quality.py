"""Answer quality per recomputed token: blending schemes against full prefill and against
the published CacheBlend scheme, on two request sets (``--set``).

- ``synthetic`` (``cacheblend_ext.testing.rag_data.make_varied_samples``): 3 to 8 chunks of
  about 64 to 400 tokens of essay text with planted facts, one-hop ("Who leads Project
  X?") and two-hop questions (the leader and the birthplace sit in different chunks),
  answer stems that keep the small model's answers extractive, several seeds.
- ``musique`` (``cacheblend_ext.testing.musique``): real retrieved passages, the MuSiQue
  questions shipped with the project, each with its 10 passages, in the original
  CacheBlend evaluation's prompt (prefix text, one chunk per passage, query text, in one
  user turn of the model's chat template). ``--questions`` picks them (``tune``,
  ``heldout``: the split drawn before any measurement); ``--passages`` sets the number of
  passages (past 10, passages of other questions are added as distractors) to vary the
  request length.

For every request, full prefill gives the reference: its greedy answer and its greedy
continuation with the distributions of its first ``--kl-tokens`` tokens (kept in
``--cache``, so reruns skip the full prefill). Each scheme, at each recompute budget (or
target), is scored by
- fidelity to full prefill: greedy-answer agreement, identical first ``--kl-tokens``
  greedy tokens, KL(full || scheme) of the first token's distribution and the mean over
  the first ``--kl-tokens`` tokens (full prefill's continuation teacher-forced through
  the scheme's cache);
- F1 of its answer against the gold answer(s), also as a percentage of full prefill's;
- what it computed: the share of a full prefill's token-layers (forced tokens, probe rows,
  every extra token), the same weighted by matrix FLOPs ("FLOPs", ``flop_fraction``: a
  row's attention grows with its position) and the share of tokens at the last layer;
- the time its selection took, the probe pass included (share of the blend).

Every scheme runs under the compute budget of the published scheme at the same ratio
(``BlendConfig.budget = "compute"``, counted in token-layers), so curves compare at equal
compute; adaptive schemes
(``--target-schemes``, one run per ``--targets`` value) choose each request's budget and
are compared by their mean computed fraction. Differences against full prefill and
against the published scheme come with paired bootstrap 95% intervals over requests;
``--pairs`` adds paired comparisons between any two runs. ``hindsight`` is a yardstick,
not a usable scheme: it ranks tokens by their true KV error over all layers, which needs
the full prefill.

Runs are checkpointed: each request's record is written to ``OUT/records/`` after every
scheme, and a rerun with ``--resume`` does only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from bench import common, quality_report

COMMAND = "quality"
HELP = "answer quality and fidelity to full prefill of blending schemes across recompute budgets"

SETS = ("synthetic", "musique")


@dataclass(frozen=True)
class Scheme:
    """A blending scheme of the harness: a config for a ratio (or, for an adaptive scheme,
    a target) and how chunks are encoded."""

    description: str
    changes: tuple = ()  # BlendConfig fields changed from the published scheme (compute budget)
    context: str = "bos"  # chunk encoding context: "bos", "prefix" (the request's system prefix) or "none"
    hindsight: bool = False
    adaptive: bool = False  # the run's value is BlendConfig.target, not the ratio

    def config(self, value: float):
        from cacheblend_ext.blend.engine import BlendConfig

        base = BlendConfig.published(0.15 if self.adaptive else value).replace(budget="compute", **dict(self.changes))
        return base.replace(target=value) if self.adaptive else base


# the probe at check layer 0: the default until this study (spelled out, so it stays what it was)
PROBE = (("selection", "probe"), ("check_layers", (0,)))

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
    "probe-c0": Scheme("probe selection at check layer 0, 8 probe tokens (the default before the MuSiQue study)",
                       PROBE),
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
    # the MuSiQue study's candidates: the probe at check layer 0 with one option changed
    "probe-32": Scheme("probe, 32 probe tokens", PROBE + (("probe_tokens", 32),)),
    "probe-64": Scheme("probe, 64 probe tokens", PROBE + (("probe_tokens", 64),)),
    "probe-value": Scheme("probe, scores weighted by the V norm", PROBE + (("probe_score", "value"),)),
    "probe-depth": Scheme("probe, attention weighted by depth (l + 1) / L", PROBE + (("probe_score", "depth"),)),
    "probe-prefix": Scheme("probe pass also runs the prefix (its rows see the attention sink), charged",
                           PROBE + (("probe_prefix", True),)),
    "probe-prefix-32": Scheme("probe pass also runs the prefix, 32 probe tokens",
                              PROBE + (("probe_prefix", True), ("probe_tokens", 32))),
    "probe-gradual": Scheme("probe at check layer 0, then gradual filtering at layers 10 and 20 by the probe's "
                            "attention from there on, equal compute",
                            (("selection", "probe"), ("check_layers", (0, 10, 20)))),
    "anchor": Scheme("chunk-anchor probing: chunk shares by the probe score of each chunk's 16 anchors",
                     PROBE + (("quota", "relevance"), ("anchor_tokens", 16))),
    "anchor-4": Scheme("chunk-anchor probing, 4 anchors per chunk", PROBE + (("quota", "relevance"), ("anchor_tokens", 4))),
    "crowding": Scheme("crowding-out-aware ranking: x0.5 next to a higher score within 2 tokens",
                       PROBE + (("crowding", 0.5), ("crowding_window", 2))),
    "crowding-8": Scheme("crowding-out-aware ranking: x0.5 next to a higher score within 8 tokens",
                         PROBE + (("crowding", 0.5), ("crowding_window", 8))),
    "span": Scheme("span: a token scores at least 0.5x the best score within 2 tokens",
                   PROBE + (("span", 0.5), ("crowding_window", 2))),
    "restricted": Scheme("restricted recompute context: chunk tokens do not see other chunks' stale KV",
                         PROBE + (("recompute_context", "restricted"),)),
    "ape-0.9": Scheme("APE-style rescaling: logits against stale reused keys x0.9", PROBE + (("reused_logit_scale", 0.9),)),
    "ape-1.1": Scheme("APE-style rescaling: logits against stale reused keys x1.1", PROBE + (("reused_logit_scale", 1.1),)),
    "adaptive": Scheme("adaptive budget: probe target on the stale share of its attention, floor 5%, ceiling 50%",
                       PROBE, adaptive=True),
}
DEFAULT_SCHEME = "default"


def _default_scheme() -> Scheme:
    """The engine's default ``BlendConfig`` (what users get), chunks encoded as it prescribes."""
    from cacheblend_ext.blend.engine import BlendConfig

    cfg = BlendConfig()
    fields = ", ".join(f"{k}={v!r}" for k, v in cfg.__dict__.items() if k != "recompute_ratio")
    return Scheme(f"BlendConfig() defaults ({fields})")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="bundled model name or local HF model dir")
    parser.add_argument("--set", default="synthetic", choices=SETS, help="the request set")
    parser.add_argument("--seeds", default="0,1", help="synthetic: data seeds (comma separated)")
    parser.add_argument("--samples", type=int, default=30, help="synthetic: requests per seed")
    parser.add_argument("--chunks", default="3,8", help="synthetic: min,max chunks per request")
    parser.add_argument("--chunk-words", default="52,320", help="synthetic: min,max filler words per chunk (~64-400 tokens)")
    parser.add_argument("--questions", default="heldout",
                        help="musique: 'tune', 'heldout', 'all' or indices ('0-9,20'); ':K' keeps the first K")
    parser.add_argument("--passages", type=int, default=10,
                        help="musique: passages per request (the first ones; past 10 other questions' passages)")
    parser.add_argument("--max-tokens", type=int, default=8000,
                        help="musique: drop trailing passages until the request fits in this many tokens")
    parser.add_argument("--budgets", default="5,10,15,20,30", help="recompute budgets in percent (the curves)")
    parser.add_argument("--curve-schemes", default="published,default,probe-c0-prefix",
                        help=f"schemes run at every budget; known: {DEFAULT_SCHEME}, {', '.join(SCHEMES)}")
    parser.add_argument("--point-schemes", default="hindsight,deviation-c0-prefix",
                        help="schemes run at --point-budget only")
    parser.add_argument("--point-budget", type=float, default=15.0, help="budget (percent) of --point-schemes")
    parser.add_argument("--target-schemes", default="", help="adaptive schemes, run at every --targets value")
    parser.add_argument("--targets", default="0.3,0.2,0.15,0.1,0.05",
                        help="targets of --target-schemes (share of the probe's attention left on stale tokens)")
    parser.add_argument("--kl-tokens", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=None,
                        help="greedy answer length limit (default: 10 synthetic, 32 musique as the original)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    parser.add_argument("--pairs", default="",
                        help="extra paired comparisons 'a@x:b@y,...' (run keys, e.g. adaptive@0.1:default@0.15)")
    parser.add_argument("--out", default="bench_out/quality", help="directory for quality.json and quality.png")
    parser.add_argument("--cache", default="bench_out/quality-cache",
                        help="directory of full-prefill references (reused across runs; '' for none)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the per-request records already in OUT/records and run only what is missing")
    parser.add_argument("--refs-only", action="store_true", help="only compute and cache the full-prefill references")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the published scheme and full KV reuse (a run to be merged with one that has them)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="run nothing: merge the quality.json files of runs over the same requests (same "
                             "seeds, samples and shape settings) into one table, plot and JSON in --out")
    parser.add_argument("--rename", default="", help="with --merge: old=new[,old=new] scheme names")


# ---------------------------------------------------------------- the request sets


@dataclass
class Request:
    """One request of a set: its texts, how its answers are cut and scored, and what its
    record says about it."""

    key: str
    prefix: str
    texts: list
    query: str
    meta: dict
    score: Callable[[str], float]  # answer text -> F1
    line_answers: bool  # answers end at the first line (musique) or the first clause (synthetic)
    normal: Callable[[str], str] = field(default=lambda s: " ".join(s.strip().lower().split()))


def synthetic_requests(args, tok) -> list[Request]:
    from cacheblend_ext.testing.rag_data import chat_segments, f1_score, make_varied_samples

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    chunk_range = _parse_pair(args.chunks, "--chunks")
    word_range = _parse_pair(args.chunk_words, "--chunk-words")
    out = []
    for seed in seeds:
        for i, sample in enumerate(make_varied_samples(args.samples, seed, chunk_range, word_range)):
            prefix, texts, query = chat_segments(tok, sample)
            out.append(Request(f"s{seed}-{i}", prefix, texts, query,
                               {"seed": seed, "index": i, "kind": sample.kind, "question": sample.question,
                                "gold": sample.answer},
                               lambda answer, gold=sample.answer: f1_score(answer, gold), line_answers=False))
    return out


def musique_requests(args, tok) -> list[Request]:
    from cacheblend_ext.testing import musique

    questions = musique.load_questions()
    out = []
    for index in musique.select_questions(args.questions, len(questions)):
        q = questions[index]
        texts = musique.passages_for(questions, index, args.passages)
        prefix, texts, query = musique.request_segments(tok, q, texts)
        size = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])
        fixed = size(prefix) + size(query)
        lengths = [size(t) for t in texts]
        while len(texts) > 1 and fixed + sum(lengths) > args.max_tokens:
            texts, lengths = texts[:-1], lengths[:-1]
        out.append(Request(f"q{index}-p{args.passages}", prefix, texts, query,
                           {"question_index": index, "kind": "musique", "question": q.question,
                            "gold": list(q.answers)},
                           lambda answer, gold=q.answers: musique.f1_score(answer, gold, tok), line_answers=True,
                           normal=lambda s: musique.normalize_answer(musique.parse_generation(s))))
    return out


# ---------------------------------------------------------------- scoring helpers


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of the softmax distributions, per row."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _answer_done(text: str, line: bool) -> bool:
    """Whether a generation's answer is complete: its first line (``line``, as the MuSiQue
    evaluation cuts it), else its first clause (newline or sentence end)."""
    if line:
        return "\n" in text.lstrip("\n")
    return "\n" in text or any(c in text for c in ".!?;")


def _answer_prefix(tok, tokens, eos, max_tokens, line=False):
    """The greedy answer inside ``tokens`` (a greedy continuation): up to the end of the
    answer (:func:`_answer_done`), EOS or ``max_tokens``. Returns ``(ids, stopped_by_eos)``."""
    out = []
    for i, t in enumerate(tokens[:max_tokens]):
        if t in eos:
            return out, True
        out.append(t)
        if _answer_done(tok.decode(out), line):
            break
    return out, False


def _greedy_answer(engine, tok, logits, cache, pos, eos, max_tokens, line=False):
    """Greedy decoding with the answer's stop rule (see :func:`_answer_prefix`)."""
    from cacheblend_ext.blend.hf import out_cache

    out = []
    for i in range(max_tokens):
        t = int(logits.argmax())
        if t in eos:
            break
        out.append(t)
        if _answer_done(tok.decode(out), line) or i == max_tokens - 1:
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
        schemes = {rename.get(name, name): Scheme(s["description"], tuple(s["changes"].items()), s["context"],
                                                  adaptive=s.get("adaptive", False))
                   for name, s in data["schemes"].items()}
        schemes.update({name: _schemes(name)[name] for name in schemes if name in SCHEMES or name == DEFAULT_SCHEME})
        for rec in data["requests"]:
            key = rec.get("key", (rec.get("seed"), rec.get("index")))
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


def _plan_runs(args) -> list:
    """``[(name, scheme, value)]``: every scheme at every budget (ratio) or target."""
    budgets = [float(b) / 100 for b in args.budgets.split(",") if b.strip()]
    point = args.point_budget / 100
    runs = [(name, s, r) for name, s in _schemes(args.curve_schemes).items() for r in budgets]
    runs += [(name, s, point) for name, s in _schemes(args.point_schemes).items()]
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    for name, s, _ in runs:
        if s.adaptive:
            raise SystemExit(f"{name!r} is adaptive: it goes in --target-schemes")
    for name, s in _schemes(args.target_schemes).items():
        if not s.adaptive:
            raise SystemExit(f"--target-schemes: {name!r} is not an adaptive scheme")
        runs += [(name, s, t) for t in targets]
    if not args.no_baselines:
        runs += [("full KV reuse", SCHEMES["published"], 0.0)]
        have = {(n, r) for n, _, r in runs}
        runs += [("published", SCHEMES["published"], r) for r in sorted(set(budgets + [point]))
                 if ("published", r) not in have]
    return runs


def _reference_key(engine, ids: torch.Tensor, ref_len: int, kl_tokens: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([engine.model_id, str(engine.dtype), ref_len, kl_tokens]).encode())
    h.update(ids.numpy().astype("int64").tobytes())
    return h.hexdigest()[:32]


def _reference(engine, segments, ref_len: int, kl_tokens: int, cache_dir: str):
    """Full prefill's reference for a request: its greedy continuation of ``ref_len`` tokens
    and the logits of the first ``kl_tokens`` of them, from ``cache_dir`` when there.
    Returns ``(tokens, logits, num_tokens, full)``; ``full`` (the prefill's result) only when
    it was computed here."""
    ids = torch.cat([engine.tokenize(s) for s in segments])
    path = os.path.join(cache_dir, _reference_key(engine, ids, ref_len, kl_tokens) + ".pt") if cache_dir else None
    if path and os.path.exists(path):
        ref = torch.load(path)
        return ref["tokens"], ref["logits"], int(ref["num_tokens"]), None
    full = engine.full_prefill(segments)
    full_cache = _cache_copy(engine.model, full)
    tokens, logits = engine.generate(full, ref_len, stop_at_eos=False, return_logits=True)
    full.cache = full_cache
    logits = logits[:kl_tokens].contiguous()
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save({"tokens": tokens, "logits": logits, "num_tokens": full.num_tokens}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return tokens, logits, full.num_tokens, full


def _run_signature(cfg, scheme) -> str:
    """What a checkpointed run was made with (a resumed run redoes a run whose config
    changed): the config's fields that differ from the published scheme's at the same
    ratio, the chunk encoding context and the ranking override."""
    base = type(cfg).published(cfg.recompute_ratio)
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()
              if k == "recompute_ratio" or v != getattr(base, k)}
    return json.dumps([fields, scheme.context, scheme.hindsight], sort_keys=True, default=str)


def _probe_profile(result, points: int = 31, top: float = 0.6) -> dict | None:
    """The probe's attention left on stale tokens as a function of how many are kept (for
    the adaptive budget's analysis): shares of its total attention at kept fractions
    0, 0.02, ..., ``top`` of the request's tokens."""
    if result.probe_attention is None:
        return None
    ranked, total = result.probe_attention
    n = result.num_tokens
    cum = torch.cat([ranked.new_zeros(1), ranked.double().cumsum(0)])
    left = ranked.double().sum() - cum
    ks = [min(int(round(top * i / (points - 1) * n)), ranked.numel()) for i in range(points)]
    return {"kept_fraction": [top * i / (points - 1) for i in range(points)],
            "stale_share": [float(left[k] / total) for k in ks], "chunk_share": float(ranked.sum() / total)}


def _run(args) -> dict:
    from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
    from cacheblend_ext.blend.models import load_model
    from cacheblend_ext.testing.rag_data import exact_match, first_clause

    torch.set_num_threads(int(os.environ.get("CACHEBLEND_QUALITY_THREADS", "1")))
    dtype = common.resolve_dtype(args)
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    engine = BlendEngine(model, tok)
    common.progress(f"kernels: {common.engine_op_backends()}, {torch.get_num_threads()} thread(s)")
    line = args.set == "musique"
    answer_tokens = args.answer_tokens if args.answer_tokens is not None else (32 if line else 10)
    ref_len = max(args.kl_tokens, answer_tokens + 1) if line else args.kl_tokens
    runs = [] if args.refs_only else _plan_runs(args)
    requests = musique_requests(args, tok) if line else synthetic_requests(args, tok)
    rec_dir = os.path.join(args.out, "records")
    os.makedirs(rec_dir, exist_ok=True)

    eos = {tok.eos_token_id, getattr(model.config, "eos_token_id", None)} - {None}
    records = []
    t_start = time.perf_counter()
    for count, req in enumerate(requests):
        rec_path = os.path.join(rec_dir, f"{req.key}.json")
        old = {}
        if args.resume and os.path.exists(rec_path):
            with open(rec_path) as f:
                old = json.load(f)
        segments_text = [req.prefix, *req.texts, req.query]
        ref_tokens, ref_logits, n, full = _reference(engine, segments_text, ref_len, args.kl_tokens, args.cache)
        answer_ids, by_eos = _answer_prefix(tok, ref_tokens, eos, min(answer_tokens, ref_len), line)
        full_answer = tok.decode(answer_ids, skip_special_tokens=True)
        if not line:
            full_answer = first_clause(full_answer)
        rec = {"key": req.key, **req.meta, "chunks": len(req.texts), "tokens": n, "full_answer": full_answer,
               "full_f1": req.score(full_answer), "full_tokens": ref_tokens[:args.kl_tokens], "runs": {}}
        rec["full_em"] = float(rec["full_f1"] == 1.0) if line else exact_match(full_answer, req.meta["gold"])
        if old.get("tokens") == n and old.get("full_tokens") == rec["full_tokens"]:
            rec["runs"] = old.get("runs", {})
        contexts = {"bos": engine.bos_ids(), "none": [], "prefix": engine.tokenize(req.prefix).tolist()}
        encoded, hindsight = {}, None
        for name, scheme, value in runs:
            cfg = BlendConfig(recompute_ratio=value) if name == DEFAULT_SCHEME else scheme.config(value)
            key = f"{name}@{value:g}"
            signature = _run_signature(cfg, scheme)
            if rec["runs"].get(key, {}).get("signature") == signature:
                continue
            if scheme.context not in encoded:
                encoded[scheme.context] = engine.encode_chunks(req.texts, context=contexts[scheme.context])
            chunks = encoded[scheme.context]
            segments = [req.prefix, *chunks, req.query]
            scores = None
            if scheme.hindsight:
                if full is None:
                    full = engine.full_prefill(segments_text)
                if hindsight is None:
                    hindsight = _hindsight_scores(engine, full, chunks, engine.plan_request(segments).spans)
                scores = hindsight
            res = engine.blend(segments, cfg, rank_scores=scores)
            logits = _teacher_forced_logits(engine, res, ref_tokens, n)
            kl = _kl_rows(ref_logits, logits[:args.kl_tokens])
            greedy = logits.argmax(-1).tolist()
            same = greedy[:len(answer_ids)] == answer_ids and (not by_eos or greedy[len(answer_ids)] in eos)
            if same:
                answer = full_answer
            else:
                ids = _greedy_answer(engine, tok, res.logits, _cache_copy(model, res), n, eos, answer_tokens, line)
                answer = tok.decode(ids, skip_special_tokens=True)
                if not line:
                    answer = first_clause(answer)
            f1 = req.score(answer)
            rec["runs"][key] = {
                "answer": answer, "f1": f1, "em": float(f1 == 1.0) if line else exact_match(answer, req.meta["gold"]),
                "agree": float(req.normal(answer) == req.normal(full_answer)),
                "same16": float(greedy[:args.kl_tokens] == ref_tokens[:args.kl_tokens]),
                "kl1": float(kl[0]), "kl16": float(kl.mean()),
                "compute": res.compute_fraction(), "flops": res.flop_fraction(model.config),
                "last_layer": res.recomputed_fraction(), "stats": res.stats, "profile": _probe_profile(res),
                "select_ms": res.timings.get("select_ms", 0.0) + res.timings.get("probe_ms", 0.0),
                "blend_ms": res.timings["total_ms"], "signature": signature}
            with open(rec_path + ".tmp", "w") as f:
                json.dump(rec, f)
            os.replace(rec_path + ".tmp", rec_path)
        if not runs:
            with open(rec_path + ".tmp", "w") as f:
                json.dump(rec, f)
            os.replace(rec_path + ".tmp", rec_path)
        records.append(rec)
        common.progress(f"request {count + 1}/{len(requests)} ({req.key}, {len(req.texts)} chunks, {n} tokens, "
                        f"{time.perf_counter() - t_start:.0f} s): gold {req.meta['gold']!r}, full {full_answer!r}")
    if args.refs_only:
        return {"command": COMMAND, "references": len(records), "seconds": time.perf_counter() - t_start}
    return _report(args, records, runs, t_start, kernels=common.engine_op_backends())


def _report(args, records, runs, t_start, **extra) -> dict:
    from cacheblend_ext.blend.engine import BlendConfig

    rows = quality_report.summarise(records, runs, args.bootstrap)
    table = quality_report.table(rows, len(records))
    print(table.render())
    pairs = quality_report.pairs(records, getattr(args, "pairs", ""), args.bootstrap)
    if pairs:
        print(quality_report.pairs_table(pairs).render())
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "quality.png")
    quality_report.plot(rows, records, png, table.title)
    result = {"command": COMMAND, "environment": common.environment(args.device), **extra,
              "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
              "schemes": {name: {"description": s.description, "changes": dict(s.changes), "context": s.context,
                                 "adaptive": s.adaptive} for name, s, _ in runs},
              "default_config": {k: (list(v) if isinstance(v, tuple) else v)
                                 for k, v in BlendConfig().__dict__.items()},
              "full_prefill": {"f1": quality_report.mean([r["full_f1"] for r in records]),
                               "em": quality_report.mean([r["full_em"] for r in records])},
              "table": table.as_dict(), "rows": rows, "pairs": pairs, "requests": records,
              "seconds": time.perf_counter() - t_start}
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {png} and {os.path.join(args.out, 'quality.json')}")
    return result


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())
