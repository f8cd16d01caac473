"""Real retrieval requests: the MuSiQue questions shipped in ``data/musique_dev.json``
(attribution and license in ``data/README.md``), built into requests the way the original
CacheBlend evaluation builds them, and scored the way it scores them.

A request is the original prefix text, one chunk per retrieved passage and the original
query text, in one user turn of the model's chat template with the generation prompt
after it (:func:`request_segments`). Answers are scored by the original token F1
(:func:`f1_score`): the first line of the generation against each gold answer, the best
counting.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
from dataclasses import dataclass

DATA_PATH = os.path.join(os.path.dirname(__file__), "data", "musique_dev.json")

PREFIX = ("You will be asked a question after reading several passages. Please directly answer the question based "
          "on the given passages. Do NOT repeat the question. The answer should be within 5 words..\nPassages:\n")
QUERY = ("\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. The answer should "
         "be within 5 words. \nQuestion:")

# Drawn once, before any measurement: random.Random(25).shuffle(list(range(75))), the first 25 tune.
TUNE = (0, 2, 3, 7, 8, 9, 13, 14, 18, 19, 21, 24, 28, 41, 42, 44, 49, 51, 55, 59, 62, 63, 69, 72, 74)
HELDOUT = tuple(i for i in range(75) if i not in TUNE)


@dataclass(frozen=True)
class Question:
    index: int
    question: str
    answers: tuple[str, ...]
    passages: tuple[tuple[str, str], ...]  # (title, text)


def load_questions(path: str = DATA_PATH) -> list[Question]:
    """The shipped questions in file order (``index`` is the position in the file)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [Question(i, q["question"], tuple(q["answers"]), tuple((c["title"], c["text"]) for c in q["ctxs"]))
            for i, q in enumerate(data)]


def select_questions(spec: str, count: int = 75) -> list[int]:
    """Question indices from ``"tune"``, ``"heldout"``, ``"all"`` or a list of indices and
    ranges (``"0-9,20"``); a ``:K`` suffix keeps the first ``K`` (``"heldout:20"``)."""
    spec = spec.strip()
    limit = None
    if ":" in spec:
        spec, tail = spec.rsplit(":", 1)
        limit = int(tail)
    named = {"tune": list(TUNE), "heldout": list(HELDOUT), "all": list(range(count))}
    if spec in named:
        out = named[spec]
    else:
        out = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                out += list(range(a, b + 1))
            else:
                out.append(int(part))
    bad = [i for i in out if not 0 <= i < count]
    if bad:
        raise ValueError(f"question indices out of range [0, {count}): {bad}")
    return out[:limit] if limit is not None else out


def normalize_question(question: str) -> str:
    """The original's question normalisation: "?" appended if missing, first letter lower-cased."""
    if not question.endswith("?"):
        question = question + "?"
    return question[0].lower() + question[1:]


def passage_text(title: str, text: str) -> str:
    return f"{title}\n\n{text}\n\n"


def passages_for(questions: list[Question], index: int, num_passages: int | None = None) -> list[str]:
    """Chunk texts of question ``index``: its own passages in order (the first
    ``num_passages`` of them); past its 10, passages of the following questions in file
    order (distractors that do not answer it), to build longer requests."""
    own = [passage_text(t, x) for t, x in questions[index].passages]
    n = len(own) if num_passages is None else num_passages
    out = own[:n]
    j = index
    while len(out) < n:
        j = (j + 1) % len(questions)
        if j == index:
            raise ValueError(f"not enough passages for {n}")
        out += [passage_text(t, x) for t, x in questions[j].passages][: n - len(out)]
    return out


def request_segments(tokenizer, question: Question, chunks: list[str]) -> tuple[str, list[str], str]:
    """``(prefix, chunks, query)`` texts: the original prefix, passages and query in one user
    turn of the tokenizer's chat template, the generation prompt after it. The prefix is the
    template's head (its default system turn, if any, and the user turn's start) plus the
    original prefix text; the query ends with the template's tail."""
    marker = "\x00CHUNKS\x00"
    query = f"{QUERY}{normalize_question(question.question)}\nAnswer:"
    text = tokenizer.apply_chat_template([{"role": "user", "content": PREFIX + marker + query}], tokenize=False,
                                         add_generation_prompt=True)
    head, tail = text.split(marker)
    return head, list(chunks), tail


# ---------------------------------------------------------------- scoring, as the original


def parse_generation(text: str) -> str:
    """The original's answer extraction: the first line (after leading newlines), "Yes" / "No" folded."""
    text = text.lstrip("\n").split("\n")[0]
    if text.startswith(("Yes", "yes")):
        return "Yes"
    words = text.split()
    if words and words[0].startswith(("No", "no")):
        return "No"
    return text


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, answers, tokenizer) -> float:
    """The original's score: token F1 (the model's tokenizer) of the parsed prediction
    against each gold answer after normalisation, the maximum."""
    pred = tokenizer(normalize_answer(parse_generation(prediction)), add_special_tokens=False)["input_ids"]
    best = 0.0
    for gold_text in answers:
        gold = tokenizer(normalize_answer(gold_text), add_special_tokens=False)["input_ids"]
        if not gold or not pred:
            best = max(best, float(gold == pred))
            continue
        same = sum((collections.Counter(gold) & collections.Counter(pred)).values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def answer_done(text: str) -> bool:
    """Whether a generation's first line is complete (a newline after some text)."""
    return "\n" in text.lstrip("\n")
