"""cacheblend: KV-cache reuse with selective recompute (CacheBlend) for PyTorch.

``torch.ops.cacheblend.*`` hold the kernels (CPU always, CUDA when built);
``cacheblend_ext.ops`` has their typed wrappers; ``cacheblend_ext.rope`` builds RoPE
tables from Hugging Face configs; ``cacheblend_ext.engine`` blends cached chunk KV into a
Hugging Face model's prefill; ``cacheblend_ext.models`` loads the bundled SmolLM2 model.
``cacheblend_ext.identity`` says which chunk KV is interchangeable (model, RoPE and
chunk keys), ``cacheblend_ext.store`` keeps chunk KV in GPU / CPU / disk / remote (Redis)
tiers,
``cacheblend_ext.pipeline`` loads it layer by layer behind the recompute,
``cacheblend_ext.controller`` picks the recompute ratio or storage tier that hides loading
and ``cacheblend_ext.cached`` runs the engine on top of the store.
"""

from ._library import has_cuda_kernels
from . import ops, reference, rope
from .rope import RopeSpec, cos_sin_cache_from_config, rope_spec_from_config
from .chunk import ChunkKV
from .engine import BlendConfig, BlendEngine, BlendResult, InMemorySource
from .models import load_model
from . import cached, controller, pipeline, store
from .cached import CachedBlender
from .controller import LoadingController, LoadingDecision, Measurements
from .pipeline import LoadReport, MemoryLayerSource, StoreLayerSource, open_layer_source
from .identity import ModelIdentity, chunk_key, model_identity, rope_identity
from .store import (ChunkCorruptError, ChunkHandle, ChunkLoadError, ChunkStore, ChunkUnavailableError,
                    StoredChunk)

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
    # chunk store, layer-wise loading, loading controller
    "cached",
    "controller",
    "pipeline",
    "store",
    "CachedBlender",
    "ChunkCorruptError",
    "ChunkHandle",
    "ChunkLoadError",
    "ChunkStore",
    "ChunkUnavailableError",
    "StoredChunk",
    "ModelIdentity",
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
