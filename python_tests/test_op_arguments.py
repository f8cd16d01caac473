"""The op wrappers refuse a non-tensor argument with a one-line TypeError that names the op
and the argument (the dispatcher's own report lists every overload over ~100 lines)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from cacheblend_ext import ops
from cacheblend_ext.rope import build_cos_sin_cache

D = 16


def _table():
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    return build_cos_sin_cache(inv_freq, 32)


def _calls():
    """Valid arguments of every public wrapper: ``{op: (function, kwargs)}``."""
    table = _table()
    ar = torch.arange
    return {
        "rope_reposition": (ops.rope_reposition, dict(
            key=torch.randn(4, 2, D), src_pos=ar(4), dst_pos=ar(4) + 1, cos_sin_cache=table, is_neox=True,
            out=torch.empty(4, 2, D))),
        "paged_view": (ops.paged_view, dict(cache=torch.zeros(3, 4, 2, D), layout="HND")),
        "fused_kv_concat": (ops.fused_kv_concat, dict(
            chunks=[torch.randn(2, 2, 3, 2, D), torch.randn(2, 2, 3, 2, D)], src_pos=ar(6) % 3, dst_pos=ar(6) + 1,
            slot_mapping=ar(6), cos_sin_cache=table, is_neox=True, k_caches=torch.zeros(2, 6, 2, D),
            v_caches=[torch.zeros(6, 2, D), torch.zeros(6, 2, D)])),
        "kv_deviation": (ops.kv_deviation, dict(
            fresh=torch.randn(3, 2, D), reused=torch.randn(5, 2, D), token_index=torch.tensor([0, 2, 4]),
            out=torch.zeros(3))),
        "select_hkvd_batched": (ops.select_hkvd_batched, dict(
            deviation=torch.rand(8), indptr=torch.tensor([0, 3, 8]), k=torch.tensor([1, 2]),
            forced=torch.zeros(8, dtype=torch.bool), candidates=torch.ones(8, dtype=torch.bool), max_selected=4)),
        "select_hkvd": (ops.select_hkvd, dict(
            deviation=torch.rand(8), k=3, forced=torch.zeros(8, dtype=torch.bool),
            candidates=torch.ones(8, dtype=torch.bool))),
        "sparse_query_attention": (ops.sparse_query_attention, dict(
            q=torch.randn(3, 2, D), k=torch.randn(5, 2, D), v=torch.randn(5, 2, D), q_pos=torch.tensor([2, 3, 4]),
            scale=0.25, q_indptr=torch.tensor([0, 3]), kv_indptr=torch.tensor([0, 5]), out=torch.empty(3, 2, D))),
        "kv_pair": (ops.kv_pair, dict(kv_cache=(torch.zeros(2, 4, 2, D), torch.zeros(2, 4, 2, D)), layout="NHD")),
        "sparse_query_attention_paged": (ops.sparse_query_attention_paged, dict(
            q=torch.randn(3, 2, D), kv_cache=(torch.randn(2, 4, 2, D), torch.randn(2, 4, 2, D)),
            q_pos=torch.tensor([2, 3, 4]), q_indptr=torch.tensor([0, 3]), kv_indptr=torch.tensor([0, 2]),
            kv_indices=torch.tensor([1, 0]), kv_last_page_len=torch.tensor([1]), scale=0.25,
            out=torch.empty(3, 2, D))),
    }


# The arguments that take several tensors (a list, a pair, or one stacked tensor).
LIST_ARGS = [("fused_kv_concat", "chunks"), ("fused_kv_concat", "k_caches"), ("fused_kv_concat", "v_caches"),
             ("kv_pair", "kv_cache"), ("sparse_query_attention_paged", "kv_cache")]
# Every other tensor argument of every wrapper.
TENSOR_ARGS = [(op, name) for op, (_, kwargs) in _calls().items() for name, value in kwargs.items()
               if isinstance(value, torch.Tensor) and (op, name) not in LIST_ARGS]
OPTIONAL = {("rope_reposition", "out"), ("kv_deviation", "token_index"), ("kv_deviation", "out"),
            ("select_hkvd_batched", "forced"), ("select_hkvd_batched", "candidates"), ("select_hkvd", "forced"),
            ("select_hkvd", "candidates"), ("sparse_query_attention", "q_indptr"),
            ("sparse_query_attention", "kv_indptr"), ("sparse_query_attention", "out"),
            ("sparse_query_attention_paged", "kv_last_page_len"), ("sparse_query_attention_paged", "out")}


def _ids(pairs):
    return [f"{op}-{name}" for op, name in pairs]


def _call(op, **replace):
    fn, kwargs = _calls()[op]
    return fn(**{**kwargs, **replace})


def _assert_one_line_type_error(excinfo, op: str, name: str, expected: str, got: str):
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert message.startswith(f"{op}: {name} must be {expected}"), message
    assert f"got {got}" in message, message


@pytest.mark.parametrize("op", list(_calls()))
def test_valid_arguments_run(op):
    """The baseline of the tests below: these arguments are accepted, so only the one
    replaced argument can cause their errors."""
    _call(op)


@pytest.mark.parametrize("op, name", TENSOR_ARGS, ids=_ids(TENSOR_ARGS))
@pytest.mark.parametrize("kind", ["numpy", "list", "int"])
def test_a_non_tensor_names_the_argument(op, name, kind):
    value = _calls()[op][1][name]
    bad, got = {"numpy": (value.numpy(), "numpy.ndarray"), "list": (value.tolist(), "list"),
                "int": (3, "int")}[kind]
    with pytest.raises(TypeError) as excinfo:
        _call(op, **{name: bad})
    expected = "a torch.Tensor or None" if (op, name) in OPTIONAL else "a torch.Tensor"
    _assert_one_line_type_error(excinfo, op, name, expected, got)
    hint = "torch.from_numpy(x)" if kind == "numpy" else "torch.tensor(x)"
    assert hint in str(excinfo.value)


def _items(value) -> list:
    return list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)


def _item_label(name: str, i: int) -> str:
    return f"kv_cache[{i}] ({('k_cache', 'v_cache')[i]})" if name == "kv_cache" else f"{name}[{i}]"


@pytest.mark.parametrize("op, name", LIST_ARGS, ids=_ids(LIST_ARGS))
@pytest.mark.parametrize("kind", ["numpy", "list"])
def test_a_non_tensor_in_a_list_names_its_index(op, name, kind):
    items = _items(_calls()[op][1][name])
    items[1] = items[1].numpy() if kind == "numpy" else items[1].tolist()
    with pytest.raises(TypeError) as excinfo:
        _call(op, **{name: items})
    _assert_one_line_type_error(excinfo, op, _item_label(name, 1), "a torch.Tensor",
                                "numpy.ndarray" if kind == "numpy" else "list")


@pytest.mark.parametrize("op, name", LIST_ARGS, ids=_ids(LIST_ARGS))
@pytest.mark.parametrize("kind", ["numpy", "int"])
def test_a_non_tensor_for_a_list_of_tensors(op, name, kind):
    items = _items(_calls()[op][1][name])
    bad, got = (np.stack([t.numpy() for t in items]), "numpy.ndarray") if kind == "numpy" else (3, "int")
    with pytest.raises(TypeError) as excinfo:
        _call(op, **{name: bad})
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert re.match(rf"{op}: {name} must be a torch\.Tensor .*(list|pair) of torch\.Tensor, got {got}", message), \
        message


def test_a_kv_cache_of_three_tensors():
    k = torch.zeros(2, 4, 2, D)
    with pytest.raises(TypeError, match=r"^kv_pair: kv_cache must be a torch\.Tensor or a \(k_cache, v_cache\) pair"):
        ops.kv_pair((k, k, k), "NHD")


@pytest.mark.parametrize("op, name, bad", [
    ("select_hkvd", "k", 2.5), ("select_hkvd", "k", "3"), ("select_hkvd", "k", [3]),
    ("select_hkvd_batched", "max_selected", 4.0), ("select_hkvd_batched", "max_selected", "4"),
])
def test_an_int_argument(op, name, bad):
    with pytest.raises(TypeError) as excinfo:
        _call(op, **{name: bad})
    _assert_one_line_type_error(excinfo, op, name, "an int", type(bad).__name__)


@pytest.mark.parametrize("op", ["sparse_query_attention", "sparse_query_attention_paged"])
@pytest.mark.parametrize("bad", ["big", [0.25]])
def test_a_scale_that_is_not_a_number(op, bad):
    with pytest.raises(TypeError) as excinfo:
        _call(op, scale=bad)
    _assert_one_line_type_error(excinfo, op, "scale", "a float or None", type(bad).__name__)


def test_int_like_arguments_still_work():
    """numpy integers and one-element integer tensors are ints for ``k`` and
    ``max_selected``; a one-element tensor is a float for ``scale``."""
    dev = torch.rand(8)
    assert torch.equal(ops.select_hkvd(dev, np.int64(3)), ops.select_hkvd(dev, 3))
    assert torch.equal(ops.select_hkvd(dev, torch.tensor(3)), ops.select_hkvd(dev, 3))
    fn, kwargs = _calls()["select_hkvd_batched"]
    a = fn(**{**kwargs, "max_selected": np.int32(4)})
    b = fn(**{**kwargs, "max_selected": 4})
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    q, k = torch.randn(3, 2, D), torch.randn(5, 2, D)
    q_pos = torch.tensor([2, 3, 4])
    torch.testing.assert_close(ops.sparse_query_attention(q, k, k, q_pos, torch.tensor(0.25)),
                               ops.sparse_query_attention(q, k, k, q_pos, 0.25))
