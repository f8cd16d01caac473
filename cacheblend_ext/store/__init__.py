"""Chunk KV storage, one tier per module: the tiered :class:`ChunkStore` (``chunk_store``)
over the GPU and CPU memory tiers (``memory``), the disk tier (``disk``) and the Redis tier
(``remote``, with its pipelined layer streaming in ``remote_stream``), one checksummed
format for files and Redis values (``chunk_format``) with an optional keyed MAC
(``integrity``), layer-by-layer access to a stored chunk (``handle``), the loader that
hides loading behind the recompute (``pipeline``) and the loading controller
(``controller``). Every chunk lives in a scope (see ``docs/security.md``)."""

from .chunk_format import FORMAT_VERSION, MAGIC, dtype_name
from .chunk_store import TIERS, ChunkStore
from .disk import FILE_SUFFIX
from .handle import ChunkCorruptError, ChunkHandle, ChunkLoadError, ChunkUnavailableError
from .integrity import MAC_ALGORITHMS, ChunkMac, mac_key_from_env
from .memory import StoredChunk

__all__ = ["FILE_SUFFIX", "FORMAT_VERSION", "MAC_ALGORITHMS", "MAGIC", "TIERS", "ChunkCorruptError", "ChunkHandle",
           "ChunkLoadError", "ChunkMac", "ChunkStore", "ChunkUnavailableError", "StoredChunk", "dtype_name",
           "mac_key_from_env"]
