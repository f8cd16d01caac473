"""Chunk KV storage: the tiered :class:`ChunkStore` (``chunk_store``: GPU and CPU memory;
``disk``; ``remote``: Redis) with one checksummed format (``chunk_format``), the
layer-by-layer loader that hides loading behind the recompute (``pipeline``) and the
loading controller (``controller``)."""

from .chunk_store import (FILE_SUFFIX, FORMAT_VERSION, MAGIC, TIERS, ChunkCorruptError, ChunkHandle, ChunkLoadError,
                          ChunkStore, ChunkUnavailableError, StoredChunk, dtype_name)

__all__ = ["FILE_SUFFIX", "FORMAT_VERSION", "MAGIC", "TIERS", "ChunkCorruptError", "ChunkHandle", "ChunkLoadError",
           "ChunkStore", "ChunkUnavailableError", "StoredChunk", "dtype_name"]
