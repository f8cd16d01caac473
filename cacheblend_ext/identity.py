"""One identity for reusable chunk KV: which model, which RoPE, which chunk.

Two pieces of chunk KV are interchangeable exactly when they were produced by the same
weights and architecture, the same RoPE table, in the same dtype, for the same token ids,
encoded after the same prefix ids. Everything that decides this lives here:

* :func:`model_identity` ``"m-..."``: the model config (without paths and library
  versions) and a fingerprint of the weights (a fixed sample of every parameter), plus an
  optional ``name`` (e.g. a weights revision). Paths are deliberately left out, so every
  machine of a fleet that loads the same weights computes the same identity.
* :func:`rope_identity` ``"r-..."``: the RoPE parameters, the inverse frequencies and
  attention factor they produce, the head and rotary dims and the pair layout.
* :func:`chunk_key`: the content key of one chunk: model and RoPE identity, dtype,
  prefix ids and token ids. The chunk store, the engine and ``CachedBlender`` all use
  this one function (through :class:`ModelIdentity`).
* :func:`check_scope`: the *scope* a stored chunk belongs to (a tenant, a user, or
  :data:`PUBLIC_SCOPE` for a corpus every requester may see). A stored chunk is
  identified by its scope and its chunk key: the same text in two scopes is two entries,
  and a lookup in one scope never finds the other's (see ``docs/security.md``). The key
  itself stays a content hash, so KV computed in one scope is interchangeable with the
  same chunk's KV in another; only the store keeps them apart.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Iterable

import torch

KEY_SCHEME = b"cacheblend-chunk-key-v1"
_FINGERPRINT_SAMPLES = 1024
PUBLIC_SCOPE = "public"
SCOPE_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z_-]{0,63}$"
_SCOPE_RE = re.compile(SCOPE_PATTERN)
# Config entries that name a place or a library version, not the model.
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset",
                 "_attn_implementation", "_commit_hash", "architectures", "output_attentions", "output_hidden_states",
                 "return_dict", "use_cache")


def hash_hex(parts: Iterable[bytes], digest_size: int = 20) -> str:
    """Hex blake2b of ``parts``, each length-prefixed (so no two part lists collide)."""
    h = hashlib.blake2b(digest_size=digest_size)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def check_scope(scope, name: str = "scope") -> str:
    """``scope`` if it is a valid scope name, else ``ValueError`` naming the argument ``name``.

    A scope is 1 to 64 ASCII letters, digits, ``_`` or ``-``, starting with a letter or a
    digit: it is a directory name in the disk tier and a part of every Redis key (so ACL
    key patterns such as ``~cacheblend:v2:tenant-a:*`` can confine a tenant to its scope).
    There is no default scope: every caller says whose chunk it stores or looks up, and
    :data:`PUBLIC_SCOPE` (``"public"``) is only used when asked for.
    """
    if not isinstance(scope, str) or not _SCOPE_RE.match(scope):
        raise ValueError(f"{name} must be a scope name (1 to 64 letters, digits, '_' or '-', starting with a letter "
                         f"or digit), e.g. a tenant id or {PUBLIC_SCOPE!r}; got {scope!r}")
    return scope


def scope_list(scope, n: int, per: str = "key") -> list[str]:
    """``scope`` (one scope name, or a sequence of one per ``per``) as ``n`` checked scope
    names; ``ValueError`` naming ``scope`` otherwise."""
    if isinstance(scope, str):
        return [check_scope(scope)] * n
    if isinstance(scope, (bytes, bytearray)) or not hasattr(scope, "__len__") or not hasattr(scope, "__iter__"):
        raise ValueError(f"scope must be a scope name or a sequence of one scope per {per}, got {scope!r}")
    scopes = [check_scope(s, f"scope[{i}]") for i, s in enumerate(scope)]
    if len(scopes) != n:
        raise ValueError(f"scope lists {len(scopes)} scopes for {n} {per}s")
    return scopes


def _ids_bytes(ids, name: str) -> bytes:
    """int64 bytes of a 1-D sequence of token ids; ``name`` is the argument named in errors."""
    t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    if t.dim() > 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.int64).reshape(-1).contiguous().numpy().tobytes()


def _config_text(config) -> str:
    if hasattr(config, "to_dict"):
        d = config.to_dict()
    elif isinstance(config, dict):
        d = dict(config)
    else:
        raise TypeError(f"model_or_config must be a model, a config or a dict, got {type(config).__name__}")
    for k in _CONFIG_NOISE:
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def weights_fingerprint(model) -> str:
    """Hash of a fixed sample of every floating-point parameter (names, shapes, values).

    Values are compared in float32, so the same weights give the same fingerprint on any
    device. The sample (up to 1,024 evenly spaced elements per tensor) catches any full or
    merged fine-tune; pass a ``name`` to :func:`model_identity` to tell apart weight sets
    that could agree on the sample.
    """
    parts = []
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if not p.dtype.is_floating_point:
                continue
            flat = p.detach().reshape(-1)
            n = flat.numel()
            k = min(n, _FINGERPRINT_SAMPLES)
            idx = torch.arange(k, dtype=torch.int64, device=flat.device) * max(n - 1, 0) // max(k - 1, 1)
            sample = flat[idx].to("cpu", torch.float32).contiguous()
            parts += [name.encode(), str(tuple(p.shape)).encode(), sample.numpy().tobytes()]
    return hash_hex(parts, 16)


def model_identity(model_or_config, name: str | None = None) -> str:
    """Identity ``"m-<hex>"`` of a Hugging Face model (config + weights fingerprint) or of a
    config alone (then only the config and ``name`` count)."""
    config = getattr(model_or_config, "config", model_or_config)
    parts = [_config_text(config).encode(), (name or "").encode()]
    if hasattr(model_or_config, "named_parameters"):
        parts.append(weights_fingerprint(model_or_config).encode())
    return "m-" + hash_hex(parts, 12)


def rope_identity(config, head_dim: int | None = None, is_neox: bool = True) -> str:
    """Identity ``"r-<hex>"`` of the RoPE a Hugging Face ``config`` applies: its parameters
    (type, theta, scaling), the float32 inverse frequencies and attention factor they
    produce, the head dim and the pair layout (NeoX half-split or GPT-J interleaved)."""
    from .rope import inv_freq_from_config, rope_parameters

    if head_dim is None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = json.dumps(rope_parameters(config), sort_keys=True, default=str)
    inv_freq, attention_factor, rope_type = inv_freq_from_config(config)
    return "r-" + hash_hex([params.encode(), inv_freq.to(torch.float64).numpy().tobytes(),
                            repr(float(attention_factor)).encode(), rope_type.encode(),
                            str(int(head_dim)).encode(), str(bool(is_neox)).encode()], 12)


def chunk_key(model_id: str, rope_id: str, dtype: torch.dtype, token_ids, prefix_ids=()) -> str:
    """Content key (40 hex digits) of a chunk's KV.

    Covers everything the KV depends on: the model and RoPE identity, the storage
    ``dtype``, the ``prefix_ids`` the chunk was encoded after (their KV dropped) and its
    ``token_ids``. Equal keys mean interchangeable KV.
    """
    if not isinstance(model_id, str) or not isinstance(rope_id, str):
        raise TypeError("model_id and rope_id must be str")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return hash_hex([KEY_SCHEME, model_id.encode(), rope_id.encode(), str(dtype).encode(),
                     _ids_bytes(prefix_ids, "prefix_ids"), _ids_bytes(token_ids, "token_ids")], 20)


@dataclass(frozen=True)
class ModelIdentity:
    """The model and RoPE identity chunk KV is stored and looked up under."""

    model_id: str
    rope_id: str

    @classmethod
    def of_model(cls, model, *, name: str | None = None, model_id: str | None = None,
                 head_dim: int | None = None, is_neox: bool = True) -> "ModelIdentity":
        """Identity of a Hugging Face causal LM (``model_id`` overrides the computed one)."""
        mid = model_id if model_id is not None else model_identity(model, name)
        return cls(mid, rope_identity(model.config, head_dim, is_neox))

    def chunk_key(self, dtype: torch.dtype, token_ids, prefix_ids=()) -> str:
        """:func:`chunk_key` under this identity."""
        return chunk_key(self.model_id, self.rope_id, dtype, token_ids, prefix_ids)

    def check_chunk(self, chunk, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` unless ``chunk`` (a ``ChunkKV``) carries the key this identity
        gives its token ids and prefix ids in ``dtype``: KV encoded by another model, RoPE
        configuration, dtype or prefix is refused."""
        expected = self.chunk_key(dtype, chunk.token_ids, chunk.prefix_ids)
        if chunk.key != expected:
            raise ValueError(f"chunk {chunk.key[:12]}... was not encoded by this model, RoPE configuration, "
                             f"dtype ({dtype}) and prefix: its key does not match")


__all__ = ["KEY_SCHEME", "PUBLIC_SCOPE", "SCOPE_PATTERN", "ModelIdentity", "check_scope", "chunk_key", "hash_hex",
           "model_identity", "rope_identity", "scope_list", "weights_fingerprint"]
