"""The blend: CacheBlend's selective recompute over a Hugging Face model.

The engine and its steps, in the order a request meets them:

- ``engine``: :class:`BlendEngine`, ``blend`` / ``blend_batch``;
- ``prefill``: its base class: tokenizing, chunk encoding, full prefill, decoding;
- ``config``: :class:`BlendConfig`, the options of a blend;
- ``schedule``: the compute budget and the check layers' token counts;
- ``request``: a request's plan (step 1), its state while the layers run (step 2, placing
  the reused KV) and its result;
- ``selection``: the probe pass (step 3) and the ranking and selection schemes (step 5);
- ``attention``: the full and the sparse-query attention of the computed rows (steps 4, 6);
- ``timing``: the steps' timings (CUDA events on a GPU);
- ``step``: the selective layers' step as one function of static-shaped tensors, run
  eagerly or replayed from CUDA graphs (``CUDAGraphStep``);
- ``hf``: the Hugging Face modules and transformers details the engine depends on;
- ``models``: the bundled SmolLM2 model and local Hugging Face model directories.
"""

from .config import BlendConfig
from .engine import BlendEngine
from .request import BlendResult

__all__ = ["BlendConfig", "BlendEngine", "BlendResult"]
