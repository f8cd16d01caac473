"""cacheblend: KV-cache reuse with selective recompute (CacheBlend) for PyTorch.

``torch.ops.cacheblend.*`` hold the kernels (CPU always, CUDA when built);
``cacheblend_ext.ops`` has their typed wrappers; ``cacheblend_ext.rope`` builds RoPE
tables from Hugging Face configs. ``cacheblend_ext.store`` keeps chunk KV in GPU / CPU /
disk tiers, ``cacheblend_ext.pipeline`` loads it layer by layer behind the recompute and
``cacheblend_ext.controller`` picks the recompute ratio or storage tier that hides loading.
"""

from ._library import has_cuda_kernels
from . import ops, reference, rope
from .rope import RopeSpec, cos_sin_cache_from_config, rope_spec_from_config
from . import controller, pipeline, store
from .controller import LoadingController, LoadingDecision, Measurements
from .pipeline import LoadReport, MemoryLayerSource, StoreLayerSource, open_layer_source
from .store import ChunkCorruptError, ChunkHandle, ChunkStore, StoredChunk, chunk_key, model_identity, rope_identity

__all__ = [
    "has_cuda_kernels",
    "ops",
    "reference",
    "rope",
    "RopeSpec",
    "cos_sin_cache_from_config",
    "rope_spec_from_config",
    # chunk store, layer-wise loading, loading controller
    "controller",
    "pipeline",
    "store",
    "ChunkCorruptError",
    "ChunkHandle",
    "ChunkStore",
    "StoredChunk",
    "chunk_key",
    "model_identity",
    "rope_identity",
    "LoadReport",
    "MemoryLayerSource",
    "StoreLayerSource",
    "open_layer_source",
    "LoadingController",
    "LoadingDecision",
    "Measurements",
]
__version__ = "0.1.0"
