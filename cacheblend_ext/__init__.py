"""cacheblend: KV-cache reuse with selective recompute (CacheBlend) for PyTorch.

``torch.ops.cacheblend.*`` hold the kernels (CPU always, CUDA when built);
``cacheblend_ext.ops`` has their typed wrappers; ``cacheblend_ext.rope`` builds RoPE
tables from Hugging Face configs; ``cacheblend_ext.engine`` blends cached chunk KV into a
Hugging Face model's prefill; ``cacheblend_ext.models`` loads the bundled SmolLM2 model.
"""

from ._library import has_cuda_kernels
from . import ops, reference, rope
from .rope import RopeSpec, cos_sin_cache_from_config, rope_spec_from_config
from .chunk import ChunkKV
from .engine import BlendConfig, BlendEngine, BlendResult, InMemorySource
from .models import load_model

__all__ = [
    "has_cuda_kernels",
    "ops",
    "reference",
    "rope",
    "RopeSpec",
    "cos_sin_cache_from_config",
    "rope_spec_from_config",
    "ChunkKV",
    "BlendConfig",
    "BlendEngine",
    "BlendResult",
    "InMemorySource",
    "load_model",
]
__version__ = "0.1.0"
