"""Layer-by-layer access to one stored chunk (:class:`ChunkHandle`, made by
:meth:`ChunkStore.open <cacheblend_ext.store.chunk_store.ChunkStore.open>`) and the errors
such a load can end in (:class:`ChunkLoadError`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .chunk_format import FormatError
from .memory import StoredChunk

if TYPE_CHECKING:
    from .chunk_store import ChunkStore


class ChunkLoadError(RuntimeError):
    """A stored chunk (``key`` in ``scope``) could not be loaded while it was being streamed
    layer by layer; the request should be retried with the chunk treated as uncached."""

    def __init__(self, key: str, reason: str, message: str, scope: str | None = None):
        super().__init__(message)
        self.key = key
        self.scope = scope
        self.reason = reason


class ChunkCorruptError(ChunkLoadError):
    """A stored chunk failed a checksum or its MAC while it was being loaded layer by layer.

    The file or remote value has already been removed.
    """

    def __init__(self, key: str, reason: str, scope: str | None = None):
        super().__init__(key, reason, f"stored chunk {key} (scope {scope}) is corrupt or forged ({reason}); it was "
                         f"removed from the store", scope)


class ChunkUnavailableError(ChunkLoadError):
    """A remote chunk could not be read to the end (server gone, timeout, value evicted)."""

    def __init__(self, key: str, reason: str, scope: str | None = None):
        super().__init__(key, reason, f"stored chunk {key} (scope {scope}) could not be loaded from the remote "
                         f"store ({reason})", scope)


class ChunkHandle:
    """One chunk opened for layer-by-layer loading (see :mod:`cacheblend_ext.store.pipeline`).

    ``scope`` and ``key`` say which chunk it is, ``tier`` where it was found. Memory tiers
    expose ``kv`` directly; a disk or remote handle reads layer ``l`` into ``host_kv[l]``
    (pinned when CUDA is available) with :meth:`load_layer`, verifying its checksum or MAC,
    and :meth:`finish` promotes the fully loaded chunk into the CPU tier. Always
    :meth:`close` a handle (or use ``with``).
    """

    def __init__(self, store: "ChunkStore", scope: str, key: str, tier: str, *, chunk: StoredChunk | None = None,
                 reader=None, positions=None, token_ids=None):
        self.store = store
        self.scope = scope
        self.key = key
        self.tier = tier
        self.reader = reader  # disk.FileReader or remote.RemoteChunk; None for memory tiers
        self._loaded = 0
        self._failed = False
        if chunk is not None:
            self.kv = chunk.kv
            self.shape = tuple(chunk.kv.shape)
            self.dtype = chunk.kv.dtype
            self.positions = chunk.positions
            self.token_ids = chunk.token_ids
            self.meta = chunk.meta
            self.host_kv = chunk.kv if chunk.kv.device.type == "cpu" else None
        else:
            header = reader.header
            self.kv = None
            self.shape = header.shape
            self.dtype = header.dtype
            self.positions = positions
            self.token_ids = token_ids
            self.meta = header.meta
            self.host_kv = torch.empty(self.shape, dtype=self.dtype, pin_memory=store.pin_memory)

    @property
    def num_layers(self) -> int:
        return int(self.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.shape[2])

    @property
    def layer_nbytes(self) -> int:
        s = self.shape
        return s[1] * s[2] * s[3] * s[4] * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.layer_nbytes

    @property
    def device(self) -> torch.device | None:
        """Where a memory tier's KV is; ``None`` while the chunk streams from disk or the remote."""
        return self.kv.device if self.kv is not None else None

    def layer(self, l: int) -> torch.Tensor:
        """Layer ``l`` ``[2, T, H, D]`` as this handle holds it: a memory tier's tensor, or
        the host buffer that :meth:`load_layer` (or a remote stream) filled."""
        return self.kv[l] if self.reader is None else self.host_kv[l]

    def load_layer(self, l: int) -> torch.Tensor:
        """Layer ``l`` ``[2, T, H, D]``, read and verified (one thread per handle). Raises
        :class:`ChunkCorruptError` on a bad checksum or MAC, :class:`ChunkUnavailableError`
        when a remote value cannot be read."""
        if self.reader is None:
            return self.kv[l]
        out = self.host_kv[l]
        try:
            self.reader.read_layer(l, out)
        except Exception as exc:
            raise self.failure(exc) from None
        self.layer_loaded()
        return out

    def layer_loaded(self) -> None:
        """One more layer is in ``host_kv`` (called by the loaders)."""
        self._loaded += 1

    def failure(self, exc: BaseException) -> BaseException:
        """The exception to raise for a failed layer load: a corrupt or forged payload is
        removed from its tier and reported as :class:`ChunkCorruptError`; a remote that
        cannot answer as :class:`ChunkUnavailableError`; anything else is returned unchanged."""
        from .remote import RemoteError

        self._failed = True
        if isinstance(exc, RemoteError):
            self.store.record_load_failure()
            return ChunkUnavailableError(self.key, str(exc), self.scope)
        if isinstance(exc, (FormatError, OSError)):
            self.store.discard_corrupt(self.reader, exc)
            return ChunkCorruptError(self.key, str(exc), self.scope)
        return exc

    def finish(self) -> None:
        """After every layer was loaded: promote the chunk into the CPU tier."""
        if self.reader is not None and not self._failed and self._loaded >= self.num_layers:
            self.store.promote(StoredChunk(self.key, self.host_kv, self.positions, self.token_ids, self.meta,
                                           scope=self.scope))

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    @staticmethod
    def remote_stream(handles: Sequence["ChunkHandle"], window: int | None = None):
        """A :class:`~cacheblend_ext.store.remote_stream.RemoteLayerStream` that fetches the
        layers of ``handles`` (all from the remote tier) into their host buffers, ``window``
        layers of requests in flight (default: the store's ``remote_in_flight``)."""
        from .remote_stream import RemoteLayerStream

        return RemoteLayerStream([h.reader for h in handles], [h.host_kv for h in handles], window)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
