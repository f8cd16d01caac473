"""cacheblend: KV-cache reuse with selective recompute (CacheBlend) for PyTorch.

``torch.ops.cacheblend.*`` hold the kernels (CPU always, CUDA when built);
``cacheblend_ext.ops`` has their typed wrappers; ``cacheblend_ext.rope`` builds RoPE
tables from Hugging Face configs.
"""

from ._library import has_cuda_kernels
from . import ops, reference, rope
from .rope import RopeSpec, cos_sin_cache_from_config, rope_spec_from_config

__all__ = [
    "has_cuda_kernels",
    "ops",
    "reference",
    "rope",
    "RopeSpec",
    "cos_sin_cache_from_config",
    "rope_spec_from_config",
]
__version__ = "0.1.0"
