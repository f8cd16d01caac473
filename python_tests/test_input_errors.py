"""Bad input to the engine and to BlendConfig: an error that names the argument and says
what was expected, raised where the mistake is made (not later, and not as a crash deep
inside torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cacheblend_ext import BlendConfig, BlendEngine
from helpers import request_parts, tiny_llama


@pytest.fixture(scope="module")
def engine():
    return BlendEngine(tiny_llama())


@pytest.fixture(scope="module")
def good(engine):
    prefix, chunk_ids, query = request_parts(seed=3, sizes=(9, 12))
    return prefix, [engine.encode_chunk(c) for c in chunk_ids], query


@pytest.mark.parametrize("segments, error, match", [
    ("Where was Alice born?", TypeError, r"segments must be a list .*got str .*\[segment\]"),
    (torch.arange(5), TypeError, r"segments must be a list .*got Tensor"),
    (None, TypeError, r"segments must be a list .*got NoneType"),
    ([None], TypeError, r"segments\[0\] must be text or a 1-D sequence of token ids, got NoneType"),
    ([7], TypeError, r"segments\[0\] .*got int"),
    ([torch.randn(6)], TypeError, r"segments\[0\] must hold integer token ids, got dtype torch.float32"),
    ([[1, 2.5, 3]], TypeError, r"segments\[0\] must hold int token ids, got an element of type float"),
    ([[1, True]], TypeError, r"segments\[0\] .*bool"),
    ([torch.ones(2, 3, dtype=torch.int64)], ValueError, r"segments\[0\] must be 1-D token ids .*\(2, 3\)"),
    ([torch.tensor([1, 160])], ValueError, r"segments\[0\] holds token ids outside \[0, 160\)"),
    ([torch.tensor([-1, 3])], ValueError, r"segments\[0\] holds token ids outside"),
    (["text"], ValueError, r"segments\[0\] is text, which needs a tokenizer"),
])
def test_bad_segments_name_the_argument(engine, segments, error, match):
    with pytest.raises(error, match=match):
        engine.blend(segments)
    with pytest.raises(error, match=match):
        engine.full_prefill(segments)


def test_bad_segment_in_a_batch(engine, good):
    prefix, chunks, query = good
    with pytest.raises(TypeError, match=r"segments\[1\]"):
        engine.blend_batch([[prefix, *chunks, query], [prefix, None, query]])


def test_encode_chunk_refuses_what_is_not_token_ids(engine):
    with pytest.raises(TypeError, match="segment must hold integer token ids, got dtype torch.float32"):
        engine.encode_chunk(torch.randn(4, 4))
    with pytest.raises(TypeError, match="segment must be text or a 1-D sequence of token ids, got NoneType"):
        engine.encode_chunk(None)
    with pytest.raises(ValueError, match="empty chunk"):
        engine.encode_chunk([])


def test_accepted_token_id_forms_give_one_result(engine, good):
    """A list of ints, a numpy array, an int32 tensor and a [1, T] tensor are the same
    segment as the int64 tensor."""
    prefix, chunks, query = good
    want = engine.blend([prefix, *chunks, query]).logits
    for form in (query.tolist(), query.numpy().astype(np.int32), query.int(), query[None]):
        got = engine.blend([prefix, *chunks, form]).logits
        assert torch.equal(got, want), type(form)


@pytest.mark.parametrize("option, value, match", [
    ("recompute_ratio", 1.5, r"recompute_ratio must be a number in \[0, 1\], got 1.5"),
    ("recompute_ratio", math.nan, "recompute_ratio .*nan"),
    ("recompute_ratio", "0.15", "recompute_ratio .*'0.15'"),
    ("recompute_ratio", True, "recompute_ratio .*True"),
    ("selection", "probes", "selection must be one of 'deviation', 'impact', 'probe', got 'probes'"),
    ("budget", "flops", "budget must be one of .*got 'flops'"),
    ("probe_tokens", 0, "probe_tokens must be a positive int, got 0"),
    ("probe_tokens", 8.0, "probe_tokens must be a positive int, got 8.0"),
    ("check_layers", (2, 1), "check_layers must be .*strictly ascending"),
    ("check_layers", (-1,), "check_layers must be .*non-negative"),
    ("check_ratios", (0.1, 0.2), "check_ratios must lie in .*not increase"),
    ("probe_prefix", "yes", "probe_prefix must be a bool"),
    ("target", 2.0, r"target must be a number in \[0, 1\]"),
    ("probe_layers", 0, "probe_layers must be a positive int or None"),
    ("reused_logit_scale", 0.0, r"reused_logit_scale must be a number in \(0, 4\]"),
])
def test_blend_config_checks_its_values_when_made(option, value, match):
    kwargs = {option: value}
    if option == "check_ratios":
        kwargs["check_layers"] = (1, 2)
    with pytest.raises(ValueError, match=match):
        BlendConfig(**kwargs)
    with pytest.raises(ValueError, match=match):  # replace() makes a new config: checked too
        BlendConfig().replace(**kwargs)


def test_blend_config_checks_the_model_depth_at_blend(engine, good):
    prefix, chunks, query = good
    cfg = BlendConfig(check_layers=(9,))  # valid as a config; the tiny model has 4 layers
    with pytest.raises(ValueError, match="check_layers .* out of range for a 4-layer model"):
        engine.blend([prefix, *chunks, query], cfg)
    assert BlendConfig(check_layers=[1, 2]).check_layers == (1, 2)  # a list is taken as the tuple


def test_cached_blender_refuses_a_bare_string_as_chunks(engine, tmp_path):
    from cacheblend_ext import CachedBlender

    blender = CachedBlender(engine, disk_dir=str(tmp_path))
    prefix, chunk_ids, query = request_parts(seed=4, sizes=(9,))
    with pytest.raises(TypeError, match=r"chunks must be a list .*got str"):
        blender.blend(prefix, "one passage", query, scope="tenant-1")
    with pytest.raises(TypeError, match=r"chunks\[1\] must hold integer token ids"):
        blender.blend(prefix, [chunk_ids[0], torch.randn(5)], query, scope="tenant-1")
