"""Shared fixtures: devices, dtypes, tolerances and output poisoning."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from torch.utils import cpp_extension

import cacheblend_ext  # noqa: F401  (fails early if the extension is not built)

HAS_CUDA = torch.cuda.is_available() and cacheblend_ext.has_cuda_kernels()

# CPU always; CUDA cases are generated too and skipped only when no GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or CUDA kernels not built)")),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Max abs error vs a float64 reference, relative to the reference's scale: one
# rounding of the result to the storage dtype dominates.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output with NaN so any element a kernel fails to write is caught."""
    return t.fill_(float("nan"))


def assert_close_to_ref(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float | None = None,
                        factor: float = 1.0) -> None:
    """``max|actual - ref| <= rtol(dtype) * factor * scale`` with ``scale`` = max|ref| by default; NaN fails."""
    actual64 = actual.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    assert actual64.shape == ref64.shape, (actual64.shape, ref64.shape)
    assert not torch.isnan(actual64).any(), "output has NaN (unwritten or invalid elements)"
    if scale is None:
        scale = max(ref64.abs().max().item(), 1e-30) if ref64.numel() else 1.0
    err = (actual64 - ref64).abs().max().item() if ref64.numel() else 0.0
    tol = RTOL[dtype] * factor * scale
    assert err <= tol, f"max abs error {err:.3e} > tolerance {tol:.3e} ({dtype})"


def request_parts(seed=0, sizes=(19, 26, 13), vocab=160):
    """A random RAG request for the tiny test models: prefix ids, chunk ids, query ids."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.tensor([1, 7, 9])
    chunks = [torch.randint(3, vocab, (n,), generator=g) for n in sizes]
    query = torch.randint(3, vocab, (8,), generator=g)
    return prefix, chunks, query


@pytest.fixture(scope="session")
def emulated_kernels():
    """Every CUDA kernel compiled for the host, run in the CUDA emulator
    (csrc/emulation/) through the CUDA wrappers' own launch code; CPU tensors in and out.
    Built on first use (about 30 s; cached by torch after that)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    csrc = root / "csrc"
    config = json.loads((csrc / "build_config.json").read_text())["emulation"]
    return cpp_extension.load(
        name="cacheblend_kernels_emulated",
        sources=[str(csrc / "emulation" / "kernels_emulated.cpp")],
        extra_include_paths=[str(csrc)],
        # The emulator plugs into the kernels from the build: a forced include (the kernel
        # headers do not include it).
        extra_cflags=config["cxx_flags"] + ["-include", str(csrc / config["forced_include"])],
        verbose=bool(os.environ.get("CACHEBLEND_VERBOSE_BUILD")),
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
