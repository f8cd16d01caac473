"""Pipelined layer streaming from the remote tier: the next layers' ``GETRANGE`` requests
of every chunk of a request stay in flight on one connection per server, and each reply is
read straight from the socket into its chunk's host buffer, then checked against its crc
(:class:`RemoteLayerStream`)."""

from __future__ import annotations

import torch

from .chunk_format import FormatError, byte_view, check_layer
from .remote import RemoteChunk, RemoteError


class _BulkReplies:
    """Reads the bulk-string replies of ``GETRANGE`` s straight from a connection's socket
    into their destination buffers (one copy: kernel to tensor), bypassing the client's
    reply parser, which holds no data when the commands are sent (checked)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            self._fill()

    def _read_exact(self, view: memoryview) -> None:
        take = min(len(self.buf), len(view))
        view[:take] = self.buf[:take]
        del self.buf[:take]
        while take < len(view):
            got = self.sock.recv_into(view[take:])
            if not got:
                raise ConnectionError("the server closed the connection")
            take += got

    def read_into(self, out: memoryview) -> int:
        """Read one reply into ``out`` if it has exactly ``len(out)`` bytes; returns the reply's
        length (a different length is read and dropped; an error reply raises)."""
        line = self._line()
        kind, body = line[:1], line[1:]
        if kind == b"-":
            raise RemoteError(f"server error: {body.decode(errors='replace')}")
        if kind != b"$":
            raise RemoteError(f"unexpected reply {line[:40]!r}")
        n = int(body)
        if n == len(out):
            self._read_exact(out)
        elif n > 0:
            self._read_exact(memoryview(bytearray(n)))
        crlf = bytearray(2)
        self._read_exact(memoryview(crlf))
        return max(n, 0)


class RemoteLayerStream:
    """Layer-by-layer fetch of several remote chunks, ``window`` layers of requests in
    flight on one connection per server.

    ``chunks`` are :class:`RemoteChunk` objects of one :class:`RedisTier` and ``buffers``
    their host tensors ``[L, 2, T, H, D]``. ``read_layer(l)`` must be called for
    ``l = 0, 1, ...`` in order; it first tops up the requests in flight to layers
    ``l .. l + window - 1``, then reads layer ``l``'s replies into each chunk's
    ``buffers[i][l]`` (straight from the socket) and checks their crc. ``window=1`` is the
    request-and-wait baseline; ``None`` takes the tier's ``in_flight``. A failure raises
    :class:`RemoteError` or ``FormatError`` with ``.chunk_index`` set to the chunk being
    read. :meth:`close` drops connections with replies still unread.
    """

    def __init__(self, chunks: list[RemoteChunk], buffers: list[torch.Tensor], window: int | None = None):
        self.chunks = list(chunks)
        self.buffers = list(buffers)
        self.remote = self.chunks[0].remote if self.chunks else None
        if window is None:
            window = self.remote.in_flight if self.remote is not None else 1
        self.window = max(1, int(window))
        self.num_layers = self.chunks[0].header.num_layers if self.chunks else 0
        self._groups = None  # [(pool, connection, replies, [chunk index])]
        self._sent = 0
        self._next = 0

    def _connect(self) -> None:
        by_pool: dict = {}
        for i, chunk in enumerate(self.chunks):
            pool = self.remote.pool_for(chunk.rkey)
            by_pool.setdefault(id(pool), (pool, []))[1].append(i)
        self._groups = []
        for pool, idx in by_pool.values():
            conn = pool.get_connection()
            self._groups.append((pool, conn, None, idx))
            if conn.can_read(timeout=0):  # a reply nobody read: start this connection afresh
                conn.disconnect()
                conn.connect()
            sock = getattr(conn, "_sock", None)
            if sock is not None and str(getattr(conn, "protocol", 2)) == "2":
                self._groups[-1] = (pool, conn, _BulkReplies(sock), idx)

    def _send(self, l: int) -> None:
        for _, conn, _, idx in self._groups:
            cmds = [("GETRANGE", self.chunks[i].rkey, *self.chunks[i].layer_range(l)) for i in idx]
            conn.send_packed_command(conn.pack_commands(cmds), check_health=False)

    def _receive(self, conn, replies, i: int, l: int) -> None:
        chunk, out = self.chunks[i], self.buffers[i][l]
        if replies is None:  # another protocol: through the client's parser
            chunk.accept_layer(l, conn.read_response(disable_decoding=True), out)
            return
        view = byte_view(out)
        n = replies.read_into(view)
        if n != len(view):
            chunk.accept_layer(l, b"" if n == 0 else bytes(n), out)  # raises: gone or wrong size
        check_layer(chunk.header, l, view)
        self.remote.count("bytes_read", n)

    def read_layer(self, l: int) -> None:
        if l != self._next:
            raise ValueError(f"layers must be read in order: expected {self._next}, got {l}")
        current = 0
        try:
            if self.remote.is_down():
                raise RemoteError("the server is marked down after a recent failure")
            if self._groups is None:
                self._connect()
            while self._sent < min(self.num_layers, l + self.window):
                self._send(self._sent)
                self._sent += 1
            for _, conn, replies, idx in self._groups:
                for i in idx:
                    current = i
                    self._receive(conn, replies, i, l)
        except self.remote.errors() as exc:
            err = self.remote.failed(exc)
            err.chunk_index = current
            raise err from None
        except (RemoteError, FormatError) as exc:
            exc.chunk_index = current
            raise
        self._next += 1

    def close(self) -> None:
        if not self._groups:
            return
        for pool, conn, _, _ in self._groups:
            if self._next < self._sent:  # replies not (fully) read: the connection cannot be reused
                conn.disconnect()
            pool.release(conn)
        self._groups = None


__all__ = ["RemoteLayerStream"]
