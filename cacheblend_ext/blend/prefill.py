"""What the blend engine does with plain prefills, a base class of
:class:`~cacheblend_ext.blend.engine.BlendEngine`: tokenizing, encoding chunks (each
prefilled alone after a context whose KV is dropped), the full-prefill and prefix-caching
baselines, the checks of a request's inputs, and greedy decoding from a result.

It uses what the engine sets up: ``model``, ``tokenizer``, ``config``, ``decoder``,
``identity``, the model's shape (``num_layers``, ``num_kv_heads``, ``head_dim``),
``device`` / ``dtype`` and the thread policy ``threads()``.
"""

from __future__ import annotations

import time

import torch

from ..chunk import ChunkKV
from ..threads import threaded
from .config import BlendConfig
from .hf import cache_layers, make_dynamic_cache, out_cache
from .request import BlendResult


def token_ids(segment, name: str, vocab_size: int | None = None) -> torch.Tensor:
    """``[T]`` int64 CPU tensor of a token-id segment: a 1-D integer tensor or array (or
    ``[1, T]``), or a list / tuple of ints, each in ``[0, vocab_size)``. Anything else is
    a TypeError or ValueError naming ``name``."""
    if segment is None or isinstance(segment, (bool, int, float, bytes)):
        raise TypeError(f"{name} must be text or a 1-D sequence of token ids, got {type(segment).__name__}")
    if isinstance(segment, (list, tuple)):
        bad = next((x for x in segment if isinstance(x, bool) or not isinstance(x, int)), None)
        if bad is not None:
            raise TypeError(f"{name} must hold int token ids, got an element of type {type(bad).__name__}")
    try:
        ids = torch.as_tensor(segment)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be text or a 1-D sequence of token ids, got {type(segment).__name__}") from e
    if ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D token ids ([T] or [1, T]), got shape {tuple(ids.shape)}")
    ids = ids.to("cpu", torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
        raise ValueError(f"{name} holds token ids outside [0, {vocab_size}): min {int(ids.min())}, "
                         f"max {int(ids.max())}")
    return ids


class Prefill:
    """Tokenizing, chunk encoding, full prefill and decoding (see the module docstring)."""

    def chunk_key(self, token_ids, prefix_ids=()) -> str:
        """Content key of the KV this engine gives ``token_ids`` encoded after ``prefix_ids``
        (see :mod:`cacheblend_ext.identity`)."""
        return self.identity.chunk_key(self.dtype, token_ids, prefix_ids)

    def tokenize(self, segment, name: str = "segment") -> torch.Tensor:
        """``[T]`` int64 token ids (on the CPU) of a text or token-id segment; ``name`` is
        the argument an error names."""
        if isinstance(segment, str):
            if self.tokenizer is None:
                raise ValueError(f"{name} is text, which needs a tokenizer: pass token ids or give BlendEngine "
                                 "a tokenizer")
            ids = self.tokenizer(segment, add_special_tokens=False)["input_ids"]
            return torch.tensor(ids, dtype=torch.int64)
        return token_ids(segment, name, getattr(self.model.config, "vocab_size", None))

    def segment_list(self, segments, name: str = "segments") -> list:
        """``segments`` as a list, refusing what is not a sequence of segments (a bare
        string would otherwise be split into one segment per character)."""
        if isinstance(segments, (str, bytes, torch.Tensor, ChunkKV)) or not isinstance(segments, (list, tuple)):
            hint = " (wrap a single segment in a list: [segment])" if isinstance(
                segments, (str, torch.Tensor, ChunkKV)) else ""
            raise TypeError(f"{name} must be a list of segments (text, token ids or ChunkKV), "
                            f"got {type(segments).__name__}{hint}")
        return list(segments)

    def bos_ids(self) -> list[int]:
        """``[bos_token_id]`` of the model (or its tokenizer), ``[]`` when it has none."""
        bos = getattr(self.model.config, "bos_token_id", None)
        if bos is None and self.tokenizer is not None:
            bos = self.tokenizer.bos_token_id
        if isinstance(bos, (list, tuple)):
            bos = bos[0]
        return [] if bos is None else [int(bos)]

    def chunk_context(self, prefix, config: BlendConfig | None = None):
        """What a chunk used after ``prefix`` (text, ids or None) is encoded after: ``prefix``
        under ``chunk_prefix="prefix"``, else None (the configured default of
        :meth:`chunk_prefix_ids`)."""
        cfg = config or self.config
        return prefix if cfg.chunk_prefix == "prefix" and prefix is not None else None

    def chunk_prefix_ids(self, context=None) -> list[int]:
        """The ids a chunk is encoded after (their KV is dropped): ``context`` (text or ids)
        tokenized, else those of ``config.chunk_prefix`` (``"none"``: nothing; ``"bos"``, and
        ``"prefix"`` when no request prefix is given: BOS)."""
        if context is not None:
            return self.tokenize(context, "context").tolist()
        return [] if self.config.chunk_prefix == "none" else self.bos_ids()

    # ------------------------------------------------------------------ HF helpers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache=None, logits_to_keep: int = 1):
        """The model's forward of ``input_ids`` ``[T]`` at ``position_ids`` ``[T]`` after the
        KV in ``cache``, with the logits of the last ``logits_to_keep`` positions (0: all)."""
        return self.decoder.forward(input_ids, position_ids, cache, logits_to_keep)

    # ------------------------------------------------------------------ chunks

    @threaded
    @torch.inference_mode()
    def encode_chunk(self, segment, context=None) -> ChunkKV:
        """Prefill one chunk after a context whose KV is dropped.

        ``context`` (text or token ids) is what the chunk is encoded after, e.g. the
        system prompt the chunk will be used with; by default the configured
        ``chunk_prefix`` (BOS, or nothing). The context's ids are part of the chunk's key.
        """
        ids = self.tokenize(segment)
        if ids.numel() == 0:
            raise ValueError("cannot encode an empty chunk")
        prefix = self.chunk_prefix_ids(context)
        self.check_positions(len(prefix) + ids.numel(),
                              f"chunk of {ids.numel()} tokens after {len(prefix)} context tokens")
        full = torch.tensor(prefix + ids.tolist(), dtype=torch.int64)
        pos = torch.arange(full.numel(), dtype=torch.int64)
        out = self.forward(full, pos)
        p = len(prefix)
        kv = torch.stack([torch.stack([k[0, :, p:].transpose(0, 1), v[0, :, p:].transpose(0, 1)])
                          for k, v in cache_layers(out_cache(out))])
        key = self.chunk_key(ids, prefix)
        return ChunkKV(kv.contiguous(), pos[p:].clone(), ids, key, tuple(prefix))

    def encode_chunks(self, segments, progress=None, context=None) -> list[ChunkKV]:
        out = []
        for i, s in enumerate(segments):
            out.append(self.encode_chunk(s, context))
            if progress is not None:
                progress(i + 1, len(segments), out[-1])
        return out

    # ------------------------------------------------------------------ full prefill baselines

    @threaded
    @torch.inference_mode()
    def full_prefill(self, segments, reuse_prefix: ChunkKV | None = None) -> BlendResult:
        """Hugging Face prefill of the whole request (the quality and speed reference).

        ``reuse_prefix``: a chunk that is an exact prefix of the request (computed at
        positions ``0..P-1``, e.g. by :meth:`encode_prefix`): its KV is reused and only the
        rest is prefilled (prefix caching).
        """
        ids = torch.cat([s.token_ids if isinstance(s, ChunkKV) else self.tokenize(s, f"segments[{i}]")
                         for i, s in enumerate(self.segment_list(segments))])
        self.check_positions(ids.numel(), f"request of {ids.numel()} tokens")
        t0 = time.perf_counter()
        cache, start = None, 0
        if reuse_prefix is not None:
            p = reuse_prefix.num_tokens
            if not torch.equal(reuse_prefix.token_ids, ids[:p]) or int(reuse_prefix.positions[0]) != 0:
                raise ValueError("reuse_prefix must be an exact prefix of the request computed at position 0")
            kv = reuse_prefix.kv.to(self.device)
            # views: Hugging Face's cache concatenates into new tensors, the chunk is not modified
            cache = make_dynamic_cache(self.model, [kv[l, 0].transpose(0, 1)[None] for l in range(kv.shape[0])],
                                       [kv[l, 1].transpose(0, 1)[None] for l in range(kv.shape[0])])
            start = p
        pos = torch.arange(start, ids.numel(), dtype=torch.int64)
        out = self.forward(ids[start:], pos, cache)
        logits = out.logits[0, -1].float()
        self.synchronize()
        t = (time.perf_counter() - t0) * 1e3
        cache_out = out_cache(out)
        return BlendResult(logits, cache_out, ids, [None] * self.num_layers,
                           torch.ones(ids.numel(), dtype=torch.bool),
                           {"total_ms": t, "threads": torch.get_num_threads()})

    @torch.inference_mode()
    def encode_prefix(self, segments) -> ChunkKV:
        """KV of ``segments`` prefilled together at position 0 (for prefix caching)."""
        ids = torch.cat([s.token_ids if isinstance(s, ChunkKV) else self.tokenize(s, f"segments[{i}]")
                         for i, s in enumerate(self.segment_list(segments))])
        pos = torch.arange(ids.numel(), dtype=torch.int64)
        out = self.forward(ids, pos)
        cache = out_cache(out)
        kv = torch.stack([torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)]) for k, v in cache_layers(cache)])
        key = self.chunk_key(ids, ())
        return ChunkKV(kv.contiguous(), pos, ids, key, ())

    def check_chunk(self, chunk: ChunkKV, name: str) -> None:
        """Refuse chunk KV that this model cannot use: wrong shape, or a key that is not the
        one this model, RoPE configuration and dtype give its tokens (KV of another model
        would blend into wrong answers without an error)."""
        want = (self.num_layers, 2, chunk.num_tokens, self.num_kv_heads, self.head_dim)
        if tuple(chunk.kv.shape) != want:
            raise ValueError(f"{name}: chunk KV must be [L={want[0]}, 2, T, H_kv={want[3]}, D={want[4]}] "
                             f"for this model, got {tuple(chunk.kv.shape)}")
        try:
            self.identity.check_chunk(chunk, self.dtype)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None

    def check_positions(self, n: int, what: str) -> None:
        """Refuse work that needs more positions than the model has (its RoPE was not
        trained past them, and some engines' tables end there)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and n > limit:
            raise ValueError(f"{what} exceeds the model's max_position_embeddings ({limit})")

    def synchronize(self):
        """Wait for the device's work (nothing on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ decoding

    @threaded
    @torch.inference_mode()
    def generate(self, result: BlendResult, max_new_tokens: int = 32, stop_at_eos: bool = True,
                 return_logits: bool = False):
        """Greedy decoding from a prefill result (blend or full). Returns the new token ids
        (and, with ``return_logits``, the ``[T, vocab]`` float32 logits that chose them).
        The result's cache is extended in place."""
        eos = getattr(self.model.config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        tokens, all_logits, result.cache = self.decoder.greedy(result.logits, result.cache, result.num_tokens,
                                                               max_new_tokens, eos if stop_at_eos else ())
        if return_logits:
            return tokens, torch.stack(all_logits)
        return tokens
