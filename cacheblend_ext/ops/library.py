"""Loads the compiled ops library (``cacheblend_ext._C``), which registers
``torch.ops.cacheblend.*``."""

import torch

try:
    from .. import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "cacheblend_ext._C is not built. Install with "
        "`pip install --no-build-isolation .` (or `-e .`) from the repository root, "
        "against the torch you run. Running from a source tree that was never built "
        f"imports the uncompiled package. Original error: {exc}"
    ) from exc


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(torch.ops.cacheblend.has_cuda_kernels())
