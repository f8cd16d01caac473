"""The checksummed (and optionally authenticated) byte format of one stored chunk, shared
by the disk files and the remote (Redis) values.

Layout (version 2)::

    MAGIC (8 bytes) | version u32 | header length u32 | header crc32 u32 | header MAC (32 bytes)
    | header (JSON, UTF-8) | zero padding to a 64-byte boundary
    | L layer blocks (kv[l], i.e. [2, T, H, D] in the stored dtype: K after RoPE, then V)
    | positions int64 [T] | token ids int64 [T']

The header records the chunk key and its scope, the model and RoPE identity, dtype,
shape, the crc32 of every layer block and of the positions / token-id block, and
(implicitly, through the shape) the total size. Layer ``l`` starts at a known offset, so a
loader can fetch and verify one layer without the others (a file read or a Redis
``GETRANGE``).

With a MAC key (:class:`cacheblend_ext.store.integrity.ChunkMac`) the header also holds a
tag per layer and one for the positions / token ids, and the prefix holds a tag over the
header bytes (which list the other tags): the MAC covers the header, every layer, the
positions and the token ids. A reader with the key verifies the header tag when it opens
a value and each layer's tag as the layer arrives (in place of its crc, which the MAC
subsumes); a value without tags, or with a wrong one, raises :class:`MacError`. A reader
without a key checks the crcs only. Version 1 files and values (no scope, no MAC) are
refused as another format version.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import torch

MAGIC = b"CBKVSTR\x00"
FORMAT_VERSION = 2
TAG_BYTES = 32
PREFIX = struct.Struct(f"<8sIII{TAG_BYTES}s")  # magic, version, header length, header crc32, header MAC
NO_TAG = bytes(TAG_BYTES)
ALIGN = 64
MAX_HEADER_BYTES = 64 << 20

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
    "float8_e5m2": getattr(torch, "float8_e5m2", None),
}
_DTYPES = {k: v for k, v in _DTYPES.items() if v is not None}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class FormatError(Exception):
    """Stored bytes that are not a valid chunk for the expected key, scope and identity."""


class MacError(FormatError):
    """Stored bytes whose MAC is missing or wrong: a forgery, a value written without the
    MAC key or under another key, or corruption (which a MAC catches too)."""


def mac_context(kind: str, scope: str, key: str, index: int = 0) -> bytes:
    """What a MAC tag binds besides the bytes it covers: the kind of block (``"header"``,
    ``"layer"``, ``"tail"``), the chunk's scope and key, and the layer index (scope and key
    hold no NUL byte: both are checked names)."""
    return b"\0".join((b"cbkv2", kind.encode(), scope.encode(), key.encode(), str(int(index)).encode()))


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored (supported: {', '.join(_DTYPES)})") from None


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable / readable byte view of a contiguous CPU tensor (any dtype)."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


@dataclass
class Header:
    key: str
    scope: str
    model_id: str
    rope_id: str
    dtype: torch.dtype
    shape: tuple  # (L, 2, T, H, D)
    data_offset: int
    layer_nbytes: int
    layer_crc: list
    num_positions: int
    num_token_ids: int
    tail_crc: int
    meta: dict
    mac: object = None  # the reader's ChunkMac: layers and tail are verified by their tags
    layer_mac: list = None  # per-layer tags (bytes), when the value carries them
    tail_mac: bytes = None

    @property
    def num_layers(self) -> int:
        return int(self.shape[0])

    def layer_offset(self, l: int) -> int:
        return self.data_offset + l * self.layer_nbytes

    @property
    def tail_offset(self) -> int:
        return self.data_offset + self.shape[0] * self.layer_nbytes

    @property
    def tail_nbytes(self) -> int:
        return 8 * (self.num_positions + self.num_token_ids)

    @property
    def total_size(self) -> int:
        return self.tail_offset + self.tail_nbytes


@dataclass
class Encoded:
    """A chunk serialised: ``parts`` (bytes / memoryviews) concatenate to ``size`` bytes."""

    parts: list
    size: int

    def to_bytes(self) -> bytes:
        return b"".join(self.parts)


def encode(key: str, scope: str, kv: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor, meta: dict,
           model_id: str, rope_id: str, mac=None) -> Encoded:
    """Serialise one chunk (``kv`` ``[L, 2, T, H, D]`` on any device; copied to the CPU if
    needed), with MAC tags when ``mac`` (a :class:`~cacheblend_ext.store.integrity.ChunkMac`)
    is given."""
    kv = kv.detach()
    if kv.device.type != "cpu":
        kv = kv.to("cpu")
    kv = kv.contiguous()
    num_layers = kv.shape[0]
    layer_nbytes = kv[0].numel() * kv.element_size() if num_layers else 0
    positions = positions.to("cpu", torch.int64).reshape(-1)
    token_ids = token_ids.to("cpu", torch.int64).reshape(-1)
    tail = torch.cat([positions, token_ids]).contiguous()
    layers = [byte_view(kv[l]) for l in range(num_layers)]
    tail_view = byte_view(tail)
    header = {
        "key": key, "scope": scope, "model_id": model_id, "rope_id": rope_id, "dtype": dtype_name(kv.dtype),
        "shape": list(kv.shape), "layer_nbytes": layer_nbytes, "layer_crc": [zlib.crc32(v) for v in layers],
        "num_positions": int(positions.numel()), "num_token_ids": int(token_ids.numel()),
        "tail_crc": zlib.crc32(tail_view), "meta": meta or {}, "mac": None,
    }
    header_tag = NO_TAG
    if mac is not None:
        header["mac"] = {"alg": mac.algorithm, "key_id": mac.key_id,
                         "layers": [mac.tag(mac_context("layer", scope, key, l), v).hex()
                                    for l, v in enumerate(layers)],
                         "tail": mac.tag(mac_context("tail", scope, key), tail_view).hex()}
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    if mac is not None:
        header_tag = mac.tag(mac_context("header", scope, key), hbytes)
    prefix_len = PREFIX.size + len(hbytes)
    data_offset = (prefix_len + ALIGN - 1) // ALIGN * ALIGN
    head = (PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes), zlib.crc32(hbytes), header_tag) + hbytes
            + b"\x00" * (data_offset - prefix_len))
    parts = [head, *layers, tail_view]
    return Encoded(parts, data_offset + num_layers * layer_nbytes + tail.numel() * 8)


def header_span(first: bytes) -> int:
    """How many leading bytes hold the prefix and JSON header, from at least the first
    ``PREFIX.size`` bytes."""
    if len(first) < PREFIX.size:
        raise FormatError("shorter than its header")
    magic, version, hlen, _, _ = PREFIX.unpack_from(first)
    if magic != MAGIC:
        raise FormatError("bad magic")
    if version != FORMAT_VERSION:
        raise FormatError(f"format version {version}, expected {FORMAT_VERSION}")
    if hlen > MAX_HEADER_BYTES:
        raise FormatError("implausible header length")
    return PREFIX.size + hlen


def decode_header(head: bytes, key: str, scope: str, model_id: str, rope_id: str, total_size: int | None = None,
                  mac=None) -> Header:
    """Parse and check the header in ``head`` (at least :func:`header_span` bytes).

    Checks the magic, version, header crc, the header MAC when ``mac`` is given (a missing
    or wrong tag raises :class:`MacError`), that it holds ``key`` of ``scope`` for this
    model and RoPE identity, that its shapes are consistent and (when given) that the
    stored value is ``total_size`` bytes. Raises :class:`FormatError` otherwise. The
    returned header verifies layers and the tail with ``mac`` (see :func:`check_layer`).
    """
    span = header_span(head)
    if len(head) < span:
        raise FormatError("shorter than its header")
    _, _, hlen, hcrc, tag = PREFIX.unpack_from(head)
    hbytes = bytes(head[PREFIX.size:span])
    if zlib.crc32(hbytes) != hcrc:
        raise FormatError("header checksum mismatch")
    if mac is not None:
        if tag == NO_TAG:
            raise MacError("carries no MAC (written without a MAC key)")
        if not mac.verify(tag, mac_context("header", scope, key), hbytes):
            raise MacError("header MAC mismatch (forged, or written under another MAC key)")
    try:
        h = json.loads(hbytes)
        header = Header(
            key=str(h["key"]), scope=str(h["scope"]), model_id=str(h["model_id"]), rope_id=str(h["rope_id"]),
            dtype=_DTYPES[h["dtype"]], shape=tuple(int(s) for s in h["shape"]),
            data_offset=(span + ALIGN - 1) // ALIGN * ALIGN,
            layer_nbytes=int(h["layer_nbytes"]), layer_crc=[int(c) for c in h["layer_crc"]],
            num_positions=int(h["num_positions"]), num_token_ids=int(h["num_token_ids"]),
            tail_crc=int(h["tail_crc"]), meta=dict(h.get("meta") or {}),
        )
        if mac is not None:
            tags = h["mac"]
            if tags is None or tags["alg"] != mac.algorithm:
                raise MacError(f"MAC {tags and tags['alg']!r} in the header, expected {mac.algorithm!r}")
            header.mac = mac
            header.layer_mac = [bytes.fromhex(t) for t in tags["layers"]]
            header.tail_mac = bytes.fromhex(tags["tail"])
    except (ValueError, KeyError, TypeError) as exc:  # (a MacError is none of these: it passes)
        raise FormatError(f"unreadable header ({exc})") from None
    if header.key != key:
        raise FormatError(f"holds chunk {header.key!r}")
    if header.scope != scope:
        raise FormatError(f"holds a chunk of scope {header.scope!r}, expected {scope!r}")
    if header.model_id != model_id or header.rope_id != rope_id:
        raise FormatError(f"written for model {header.model_id}/{header.rope_id}, expected {model_id}/{rope_id}")
    shape = header.shape
    itemsize = torch.empty((), dtype=header.dtype).element_size()
    if (len(shape) != 5 or shape[1] != 2 or len(header.layer_crc) != shape[0]
            or header.layer_nbytes != itemsize * shape[1] * shape[2] * shape[3] * shape[4]
            or header.num_positions != shape[2]
            or (header.layer_mac is not None and len(header.layer_mac) != shape[0])):
        raise FormatError("inconsistent shapes in header")
    if total_size is not None and total_size != header.total_size:
        raise FormatError(f"{total_size} bytes stored, header says {header.total_size} (truncated or padded)")
    return header


def check_layer(header: Header, l: int, data) -> None:
    """Raise :class:`FormatError` unless ``data`` is layer ``l``'s bytes: the right size, and
    its MAC tag when the header was opened with a MAC key (:class:`MacError` if not),
    else its crc."""
    if len(data) != header.layer_nbytes:
        raise FormatError(f"layer {l} is {len(data)} bytes, expected {header.layer_nbytes}")
    if header.mac is not None:
        if not header.mac.verify(header.layer_mac[l], mac_context("layer", header.scope, header.key, l), data):
            raise MacError(f"layer {l} MAC mismatch")
    elif zlib.crc32(data) != header.layer_crc[l]:
        raise FormatError(f"layer {l} checksum mismatch")


def decode_tail(header: Header, data) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, token_ids)`` from the tail bytes, verified by their MAC tag (with a
    MAC key) or their crc."""
    if len(data) != header.tail_nbytes:
        raise FormatError(f"positions/token ids are {len(data)} bytes, expected {header.tail_nbytes}")
    if header.mac is not None:
        if not header.mac.verify(header.tail_mac, mac_context("tail", header.scope, header.key), data):
            raise MacError("positions/token ids MAC mismatch")
    elif zlib.crc32(data) != header.tail_crc:
        raise FormatError("positions/token ids checksum mismatch")
    tail = torch.frombuffer(bytearray(data), dtype=torch.int64) if len(data) else torch.zeros(0, dtype=torch.int64)
    return tail[: header.num_positions].clone(), tail[header.num_positions:].clone()


__all__ = ["ALIGN", "FORMAT_VERSION", "MAGIC", "NO_TAG", "PREFIX", "TAG_BYTES", "Encoded", "FormatError", "Header",
           "MacError", "byte_view", "check_layer", "decode_header", "decode_tail", "dtype_name", "encode",
           "header_span", "mac_context"]
