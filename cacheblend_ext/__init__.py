"""cacheblend: KV-cache reuse with selective recompute (CacheBlend) for PyTorch.

``torch.ops.cacheblend.*`` hold the kernels (CPU always, CUDA when built);
``cacheblend_ext.ops`` has their typed wrappers (``ops.reference``: float64 references);
``cacheblend_ext.rope`` builds RoPE tables from Hugging Face configs;
``cacheblend_ext.blend`` blends cached chunk KV into a Hugging Face model's prefill
(``blend.engine``) and loads the bundled SmolLM2 model (``blend.models``).
``cacheblend_ext.layer_source`` is how reused KV reaches the engine, layer by layer.
``cacheblend_ext.identity`` says which chunk KV is interchangeable (model, RoPE and
chunk keys) and names the scopes that keep tenants' chunks apart,
``cacheblend_ext.store`` keeps chunk KV in GPU / CPU / disk / remote (Redis) tiers
(``store.integrity``: the optional keyed MAC that refuses forged values), ``store.pipeline`` loads it layer by layer behind the recompute,
``store.controller`` picks the recompute ratio or storage tier that hides loading
and ``cacheblend_ext.cached`` runs the engine on top of the store.
``cacheblend_ext.testing`` holds helpers of the tests and benchmarks.
"""

from .ops.library import has_cuda_kernels
from . import ops
from .ops import reference
from . import rope
from .rope import RopeSpec, cos_sin_cache_from_config, rope_spec_from_config
from .chunk import ChunkKV
from .layer_source import InMemorySource, LayerSource, LoadReport, MemoryLayerSource
from .blend.engine import BlendConfig, BlendEngine, BlendResult
from .blend.models import load_model
from . import store
from .store import controller, pipeline
from . import cached
from .cached import CachedBlender
from .store.controller import LoadingController, LoadingDecision, Measurements
from .store.pipeline import StoreLayerSource, open_layer_source
from .identity import PUBLIC_SCOPE, ModelIdentity, check_scope, chunk_key, model_identity, rope_identity
from .store import (ChunkCorruptError, ChunkHandle, ChunkLoadError, ChunkMac, ChunkStore, ChunkUnavailableError,
                    StoredChunk, mac_key_from_env)

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
    "LayerSource",
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
    "ChunkMac",
    "ChunkStore",
    "ChunkUnavailableError",
    "StoredChunk",
    "mac_key_from_env",
    "PUBLIC_SCOPE",
    "ModelIdentity",
    "check_scope",
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
