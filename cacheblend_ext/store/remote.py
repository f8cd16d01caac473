"""The chunk store's remote tier: chunk KV shared by every process and machine through
Redis (or Valkey), single server or Redis Cluster.

Values
------
One chunk is one Redis string holding the bytes of :mod:`cacheblend_ext.store.chunk_format`
(the disk file format: header with a crc32 per layer and, with a MAC key, MAC tags; then
the layers, then positions and token ids) under
``<namespace>:v<format version>:<scope>:<model id>:<rope id>:<chunk key>``. A scope,
model, RoPE configuration or format version never reads another one's values; a value
that is there anyway (copied, or written by a buggy or hostile client) fails the header
check (or the MAC). The scope comes right after the version, so a Redis ACL can confine
a client to its scopes (``~cacheblend:v2:tenant-a:*``, ``%R~cacheblend:v2:public:*``).

Connections
-----------
``redis://[user:password@]host:port/db``, ``rediss://`` (TLS), ``unix:///path``,
``redis+cluster://`` and ``rediss+cluster://`` (a Redis Cluster over TLS; any node is the
entry point), or a client object. TLS and other client settings go in the URL's query
(``?ssl_ca_certs=/etc/cacheblend/ca.pem``) or in ``options`` (``ChunkStore(remote_options=
{"ssl_ca_certs": ..., "ssl_certfile": ..., "ssl_keyfile": ...})``): redis-py's keyword
arguments, for a lone server or every node of a cluster.

* Reads: a batch of ``STRLEN`` + ``GETRANGE`` of the header for every chunk of a request
  (one round trip), one batch for positions and token ids, then one ``GETRANGE`` per
  layer and chunk. :class:`~cacheblend_ext.store.remote_stream.RemoteLayerStream` keeps
  ``in_flight`` layers of requests pipelined on one connection per server and hands each
  layer over as soon as it arrived and passed its crc.
* Writes: one ``SET ... NX`` per chunk (atomic: readers see the whole value or nothing;
  concurrent writers of one chunk leave one complete value). ``ttl_s`` adds ``EX``.
  Write-through (default): :meth:`ChunkStore.put` returns after the ``SET``. Write-back:
  a background thread sends the ``SET`` s in order; ``put`` waits only if more than
  ``write_back_bytes`` are queued; :meth:`ChunkStore.flush` waits for the queue.
* Eviction by the server (``maxmemory`` + an LRU policy, or a TTL) is a plain miss; a
  value evicted while a request streams it is reported as
  :class:`~cacheblend_ext.store.ChunkUnavailableError` (the request is recomputed).

Failures
--------
Every command runs under a socket timeout (``timeout_s``, connect ``connect_timeout_s``),
so a slow or stalled server costs at most that long per command and never hangs a
request. A connection error or timeout counts in ``stats()["remote"]`` and marks the
server down for ``retry_after_s``: meanwhile lookups are misses and writes are skipped
without touching the network. A value whose header, size or crc is wrong is a miss and is
deleted, but only if it is still the same value (a compare-and-delete script, so a good
value another process just wrote is kept).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from urllib.parse import urlsplit, urlunsplit

import torch

from .chunk_format import (FORMAT_VERSION, FormatError, Header, byte_view, check_layer, decode_header,
                           decode_tail, header_span)

HEAD_PROBE = 8192  # bytes of a value read to find its header (headers are usually smaller)

_COMPARE_AND_DELETE = """
if redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RemoteError(Exception):
    """The remote store did not answer (connection, timeout, protocol) or lost a value."""


def _redis():
    try:
        import redis
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("the remote tier needs the redis client: pip install redis hiredis") from None
    return redis


SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def check_url(remote: str) -> str:
    """The scheme of a remote URL (``ValueError`` naming ``remote`` for any other)."""
    scheme = urlsplit(remote).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"remote URL must start with redis://, rediss://, unix://, redis+cluster:// or "
                         f"rediss+cluster://, got {_redact(remote)!r}")
    return scheme


def _redact(url: str) -> str:
    """``url`` without its password (for error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc) + tuple(parts[2:]))


def connect(remote, timeout_s: float = 2.0, connect_timeout_s: float = 1.0, options: dict | None = None):
    """A Redis client for ``remote``: a URL (see the module docstring: ``redis://``,
    ``rediss://``, ``unix://``, ``redis+cluster://``, ``rediss+cluster://``; a user and
    password in the URL authenticate, as an ACL user or the default one) with the client
    keyword arguments ``options`` (e.g. ``ssl_ca_certs``), or a client object
    (``redis.Redis`` / ``redis.cluster.RedisCluster``, used as is: give it a
    ``socket_timeout``)."""
    redis = _redis()
    if not isinstance(remote, str):
        if not (hasattr(remote, "connection_pool") or hasattr(remote, "get_node_from_key")):
            raise TypeError(f"remote must be a redis URL or a redis client, got {type(remote).__name__}")
        if options:
            raise ValueError("remote_options apply to a remote URL; configure a client object yourself")
        if _decodes_responses(remote):
            raise ValueError("remote: the redis client must return bytes (decode_responses=False)")
        return remote
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    scheme = check_url(remote)
    opts = dict(socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s, retry=Retry(NoBackoff(), 0))
    opts.update(options or {})
    if scheme.endswith("+cluster"):
        from redis.cluster import RedisCluster

        parts = urlsplit(remote)
        url = urlunsplit((scheme[: -len("+cluster")],) + tuple(parts[1:]))
        return RedisCluster.from_url(url, **opts)
    return redis.Redis.from_url(remote, **opts)


def _decodes_responses(client) -> bool:
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    if not kwargs and hasattr(client, "get_default_node"):
        node = client.get_default_node()
        kwargs = getattr(getattr(node, "redis_connection", None), "connection_pool", None).connection_kwargs
    return bool(kwargs.get("decode_responses"))


class RedisTier:
    """Chunk values on a Redis server or cluster (see the module docstring)."""

    name = "remote"

    def __init__(self, remote, model_id: str, rope_id: str, *, namespace: str = "cacheblend",
                 timeout_s: float = 2.0, connect_timeout_s: float = 1.0, retry_after_s: float = 5.0,
                 ttl_s: int | None = None, in_flight: int = 4, options: dict | None = None, mac=None):
        if ttl_s is not None and int(ttl_s) <= 0:
            raise ValueError(f"remote_ttl_s must be a positive number of seconds or None, got {ttl_s}")
        if int(in_flight) < 1:
            raise ValueError(f"remote_in_flight must be at least 1, got {in_flight}")
        if not namespace or any(c in namespace for c in " \r\n*?[]\\"):
            raise ValueError(f"remote_namespace must be a non-empty word without glob characters, got {namespace!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"remote_options must be a dict of redis client keyword arguments, "
                            f"got {type(options).__name__}")
        self.redis = _redis()
        # A cluster client contacts its nodes when it is made: make it on first use, so a
        # cluster that is down when the store opens is a counted miss like a lone server.
        self._spec = (remote, timeout_s, connect_timeout_s, options)
        lazy = isinstance(remote, str) and check_url(remote).endswith("+cluster")
        self._client = None if lazy else connect(*self._spec)
        self._client_lock = threading.Lock()
        self.cluster = lazy or hasattr(self._client, "get_node_from_key")
        self.namespace = f"{namespace}:v{FORMAT_VERSION}"
        self.model_id, self.rope_id = model_id, rope_id
        self.mac = mac  # ChunkMac or None
        self.ttl_s = int(ttl_s) if ttl_s is not None else None
        self.in_flight = int(in_flight)
        self.retry_after_s = float(retry_after_s)
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.counters = {"misses": 0, "errors": 0, "timeouts": 0, "skipped_down": 0, "lost_mid_read": 0,
                         "writes": 0, "already_present": 0, "write_errors": 0, "bytes_read": 0, "bytes_written": 0}

    # -- bookkeeping -----------------------------------------------------------
    @property
    def client(self):
        """The redis client (a cluster client is made on first use; that may raise a redis error)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = connect(*self._spec)
        return self._client

    def prefix(self, scope: str) -> str:
        """What every Redis key of ``scope``'s chunks (of this model and RoPE) starts with."""
        return f"{self.namespace}:{scope}:{self.model_id}:{self.rope_id}:"

    def redis_key(self, scope: str, key: str) -> str:
        return self.prefix(scope) + key

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def is_down(self) -> bool:
        """True while a recent connection error or timeout says not to try the server."""
        return time.monotonic() < self._down_until

    def failed(self, exc: BaseException) -> RemoteError:
        """Count a redis error (connection errors and timeouts mark the server down)."""
        r = self.redis.exceptions
        if isinstance(exc, (r.TimeoutError, TimeoutError)):
            self.count("timeouts")
        else:
            self.count("errors")
        if isinstance(exc, (r.ConnectionError, r.TimeoutError, TimeoutError, OSError, r.RedisClusterException)):
            self._down_until = time.monotonic() + self.retry_after_s
        return RemoteError(f"{type(exc).__name__}: {exc}")

    def errors(self) -> tuple:
        """The exceptions that mean the server did not answer (for ``except``)."""
        return (self.redis.exceptions.RedisError, self.redis.exceptions.RedisClusterException, OSError)

    def counters_snapshot(self) -> dict:
        """A copy of :attr:`counters`, taken under their lock."""
        with self._lock:
            return dict(self.counters)

    # -- lookups -----------------------------------------------------------------
    def exists(self, scope: str, key: str) -> bool:
        if self.is_down():
            self.count("skipped_down")
            return False
        try:
            return bool(self.client.exists(self.redis_key(scope, key)))
        except self.errors() as exc:
            self.failed(exc)
            return False

    def open_many(self, addresses: list[tuple[str, str]]) -> list:
        """For each ``(scope, key)`` a :class:`RemoteChunk` (header and positions verified),
        ``None`` (a miss) or the :class:`~.chunk_format.FormatError` that refused the value
        (corrupt, or a bad MAC; the value was deleted). Two round trips for all of them."""
        if not addresses:
            return []
        if self.is_down():
            self.count("skipped_down", len(addresses))
            return [None] * len(addresses)
        n = len(addresses)
        try:
            rkeys = [self.redis_key(s, k) for s, k in addresses]
            heads = self._batch([("strlen", (r,)) for r in rkeys]
                                + [("getrange", (r, 0, HEAD_PROBE - 1)) for r in rkeys])
            out = [self._parse_head(s, k, heads[i], heads[n + i]) for i, (s, k) in enumerate(addresses)]
            opened = [i for i, c in enumerate(out) if isinstance(c, RemoteChunk)]
            tails = self._batch([("getrange", (c.rkey, c.header.tail_offset, c.header.total_size - 1))
                                 for c in (out[i] for i in opened)])
        except self.errors() as exc:
            self.failed(exc)
            return [None] * n
        for i, data in zip(opened, tails):
            chunk = out[i]
            if self._refused_command(data):
                out[i] = None
                continue
            try:
                chunk.positions, chunk.token_ids = decode_tail(chunk.header, data)
            except FormatError as exc:
                out[i] = self._refuse(chunk.rkey, chunk.head, exc)
        return out

    def _batch(self, commands: list) -> list:
        """The replies of ``commands`` sent in one pipeline. A command the server refused
        (e.g. an ACL that denies this client a scope's keys) leaves its error in the list;
        any other failure raises."""
        pipe = self.client.pipeline(transaction=False)
        for name, args in commands:
            getattr(pipe, name)(*args)
        results = pipe.execute(raise_on_error=False)
        for r in results:
            if isinstance(r, Exception) and not isinstance(r, self.redis.exceptions.ResponseError):
                raise r
        return results

    def _refused_command(self, reply) -> bool:
        """Whether ``reply`` is an error the server answered one command with: counted in
        ``errors`` (the chunk is a miss; the connection and the other chunks are fine)."""
        if isinstance(reply, Exception):
            self.count("errors")
            return True
        return False

    def _parse_head(self, scope: str, key: str, size, head):
        rkey = self.redis_key(scope, key)
        if self._refused_command(size) or self._refused_command(head):
            return None
        if not size:
            self.count("misses")
            return None
        try:
            span = header_span(head)
            if span > len(head) and size >= span:
                head = self.client.getrange(rkey, 0, span - 1)
            header = decode_header(head, key, scope, self.model_id, self.rope_id, int(size), mac=self.mac)
        except FormatError as exc:
            return self._refuse(rkey, head, exc)
        # the header alone identifies the value later (a probe may reach into the layers,
        # which a corruption found while streaming has changed)
        return RemoteChunk(self, scope, key, header, bytes(head[:span]))

    def _refuse(self, rkey: str, head: bytes, exc: FormatError) -> FormatError:
        self.delete_if_same(rkey, head)
        return exc

    def read_whole(self, scope: str, key: str):
        """``(header, value bytes, positions, token ids)`` of a verified chunk, ``None`` on a
        miss, or the :class:`~.chunk_format.FormatError` that refused it (the value was
        deleted)."""
        if self.is_down():
            self.count("skipped_down")
            return None
        rkey = self.redis_key(scope, key)
        try:
            data = self.client.get(rkey)
        except self.errors() as exc:
            self.failed(exc)
            return None
        if not data:
            self.count("misses")
            return None
        try:
            header = decode_header(data, key, scope, self.model_id, self.rope_id, len(data), mac=self.mac)
            view = memoryview(data)
            for l in range(header.num_layers):
                check_layer(header, l, view[header.layer_offset(l):header.layer_offset(l) + header.layer_nbytes])
            positions, token_ids = decode_tail(header, view[header.tail_offset:])
        except FormatError as exc:
            return self._refuse(rkey, data[:HEAD_PROBE], exc)
        self.count("bytes_read", len(data))
        return header, data, positions, token_ids

    def delete_if_same(self, rkey: str, head: bytes) -> None:
        """Delete ``rkey`` if its value still starts with ``head`` (not a newer value)."""
        try:
            self.client.eval(_COMPARE_AND_DELETE, 1, rkey, head, len(head))
        except self.errors() as exc:
            self.failed(exc)

    # -- writes --------------------------------------------------------------------
    def write(self, scope: str, key: str, value: bytes) -> str:
        """``SET NX`` one chunk value: ``"written"``, ``"exists"`` or ``"skipped"`` (server
        down). Raises :class:`RemoteError` if the server fails (or refuses: an ACL)."""
        if self.is_down():
            self.count("skipped_down")
            return "skipped"
        try:
            done = self.client.set(self.redis_key(scope, key), value, nx=True, ex=self.ttl_s)
        except self.errors() as exc:
            self.count("write_errors")
            raise self.failed(exc) from None
        if done:
            self.count("writes")
            self.count("bytes_written", len(value))
            return "written"
        self.count("already_present")
        return "exists"

    def delete(self, scope: str, key: str) -> None:
        try:
            self.client.delete(self.redis_key(scope, key))
        except self.errors() as exc:
            self.failed(exc)

    def _scan(self, pattern: str) -> list[str]:
        try:
            return sorted(k.decode() for k in self.client.scan_iter(match=pattern, count=1000))
        except self.errors() as exc:
            self.failed(exc)
            return []

    def keys(self, scope: str) -> list[str]:
        """Chunk keys of ``scope`` in this namespace (a ``SCAN`` over every server)."""
        prefix = self.prefix(scope)
        return [k[len(prefix):] for k in self._scan(prefix + "*")]

    def clear(self, scope: str | None = None) -> None:
        """Delete the values of ``scope`` (of every scope when ``None``) of this model and RoPE."""
        pattern = self.prefix(scope) + "*" if scope is not None else self.prefix("*") + "*"
        for rkey in self._scan(pattern):
            try:
                self.client.delete(rkey)
            except self.errors() as exc:
                self.failed(exc)

    # -- layer streaming -------------------------------------------------------------
    def pool_for(self, rkey: str):
        """The connection pool of the server holding ``rkey``."""
        if self.cluster:
            return self.client.get_node_from_key(rkey).redis_connection.connection_pool
        return self.client.connection_pool


class RemoteChunk:
    """One chunk found on the remote: its verified header, positions and token ids."""

    tier = "remote"

    def __init__(self, remote: RedisTier, scope: str, key: str, header: Header, head: bytes):
        self.remote, self.scope, self.key, self.header, self.head = remote, scope, key, header, head
        self.rkey = remote.redis_key(scope, key)
        self.positions = self.token_ids = None

    def layer_range(self, l: int) -> tuple[int, int]:
        start = self.header.layer_offset(l)
        return start, start + self.header.layer_nbytes - 1

    def accept_layer(self, l: int, data, out: torch.Tensor) -> None:
        """Check a fetched layer (``RemoteError`` if the value is gone, ``FormatError`` if it
        is corrupt) and copy it into ``out``."""
        if not data:
            self.remote.count("lost_mid_read")
            raise RemoteError(f"the value was evicted or deleted while layer {l} was being read")
        check_layer(self.header, l, data)
        byte_view(out)[:] = data
        self.remote.count("bytes_read", len(data))

    def read_layer(self, l: int, out: torch.Tensor) -> None:
        """Fetch one layer with its own request (the pipelined path is
        :class:`~cacheblend_ext.store.remote_stream.RemoteLayerStream`)."""
        if self.remote.is_down():
            raise RemoteError("the server is marked down after a recent failure")
        try:
            data = self.remote.client.getrange(self.rkey, *self.layer_range(l))
        except self.remote.errors() as exc:
            raise self.remote.failed(exc) from None
        self.accept_layer(l, data, out)

    def discard(self) -> None:
        """The value failed a check: delete it if it is still the value read."""
        self.remote.delete_if_same(self.rkey, self.head)

    def close(self) -> None:
        pass


class WriteBack:
    """Sends ``SET`` s for :class:`RedisTier` in a background thread, in order; ``submit``
    waits while more than ``max_bytes`` are queued."""

    def __init__(self, remote: RedisTier, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"write_back_bytes must be positive, got {max_bytes}")
        self.remote = remote
        self.max_bytes = int(max_bytes)
        self._queue: deque = deque()
        self._queued_bytes = 0
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="cacheblend-remote-writer", daemon=True)
        self._thread.start()

    def submit(self, scope: str, key: str, value: bytes) -> None:
        with self._cond:
            while self._queue and self._queued_bytes + len(value) > self.max_bytes and not self._closed:
                self._cond.wait()
            if self._closed:
                raise RuntimeError("the store was closed")
            self._queue.append((scope, key, value))
            self._queued_bytes += len(value)
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + int(self._busy)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                scope, key, value = self._queue[0]
                self._busy = True
            try:
                self.remote.write(scope, key, value)
            except RemoteError:
                pass  # counted in write_errors; the chunk stays in the local tiers
            with self._cond:
                self._queue.popleft()
                self._queued_bytes -= len(value)
                self._busy = False
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write was sent; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()


__all__ = ["SCHEMES", "RedisTier", "RemoteChunk", "RemoteError", "WriteBack", "check_url", "connect"]
