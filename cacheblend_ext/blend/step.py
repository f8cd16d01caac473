"""The selective layers' step (step 6 of the blend): once a request's tokens are selected,
every later layer does the same work on the same shapes, written once here as
:func:`selective_layer`, a function of static-shaped tensors (no host synchronisation,
no shape that depends on data), so that ``torch.compile(fullgraph=True)`` traces it whole
and a CUDA graph can capture it.

The engine runs it through a *step runner*: :class:`EagerStep` (the default) calls it;
:class:`CUDAGraphStep` captures it once per layer for a request shape and replays the
graphs (``BlendEngine.blend(..., step=CUDAGraphStep(engine.device))``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops


def selective_layer(decoder, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    q_pos: torch.Tensor, slots: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
                    q_indptr: torch.Tensor | None = None, kv_indptr: torch.Tensor | None = None) -> torch.Tensor:
    """One selective layer for ``M`` computed rows; returns their next hidden states ``[M, hidden]``.

    ``hidden`` ``[M, hidden]`` and ``cos`` / ``sin`` ``[M, rotary_dim]`` are the rows' hidden
    states and RoPE angles, ``q_pos`` ``[M]`` their positions in their request, ``slots``
    ``[M]`` their rows in ``k_layer`` / ``v_layer`` ``[N, H_kv, D]`` (the layer's KV of the
    request, or of a ragged batch whose requests start at ``kv_indptr``; ``q_indptr`` gives
    each request's rows). The rows' fresh K/V are written into ``k_layer`` / ``v_layer`` at
    ``slots`` (the only side effect), then exact position-causal sparse-query attention
    against all keys, the output projection and the MLP.
    """
    q, k, v = decoder.layer_qkv(layer, hidden, cos, sin)
    k_layer.index_copy_(0, slots, k)
    v_layer.index_copy_(0, slots, v)
    o = ops.sparse_query_attention(q, k_layer, v_layer, q_pos, decoder.scaling, q_indptr=q_indptr, kv_indptr=kv_indptr)
    return decoder.o_proj_mlp(layer, [hidden], [o])[0]


@dataclass
class SelectiveRows:
    """The inputs of :func:`selective_layer` for a blend's selective layers, gathered once
    when every request of the blend is selective (:meth:`of_states`): the rows of all its
    requests in order, ``sizes`` rows each."""

    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    q_pos: torch.Tensor
    slots: torch.Tensor
    q_indptr: torch.Tensor | None
    kv_indptr: torch.Tensor | None
    sizes: tuple

    @classmethod
    def of_states(cls, states: list, l: int) -> "SelectiveRows":
        """The rows of ``states`` (each selective: ``state.sel`` set) at layer ``l``; a
        batch's requests are slices of one KV buffer (``state.batch_kv`` /
        ``batch_offset``), with index pointers made when the batch started
        (``batch_indptr``)."""
        sizes = tuple(int(s.sel.numel()) for s in states)
        if len(states) == 1:
            s = states[0]
            return cls(s.hidden, s.cos[s.sel], s.sin[s.sel], s.sel, s.sel, None, None, sizes)
        q_indptr, kv_indptr = states[0].batch_indptr
        q_indptr = q_indptr[l]
        return cls(torch.cat([s.hidden for s in states]), torch.cat([s.cos[s.sel] for s in states]),
                   torch.cat([s.sin[s.sel] for s in states]), torch.cat([s.sel for s in states]),
                   torch.cat([s.sel + s.batch_offset for s in states]), q_indptr, kv_indptr, sizes)


class EagerStep:
    """Runs :func:`selective_layer` as it is (the engine's default step runner).

    A step runner's protocol: :meth:`start` with the blend's :class:`SelectiveRows` at its
    first selective layer, :meth:`layer` for each selective layer in order, then
    :meth:`hidden` for the rows' final hidden states."""

    def start(self, decoder, rows: SelectiveRows) -> None:
        self.decoder, self.rows = decoder, rows

    def layer(self, l: int, k_layer: torch.Tensor, v_layer: torch.Tensor) -> None:
        r = self.rows
        r.hidden = selective_layer(self.decoder, self.decoder.layers[l], r.hidden, r.cos, r.sin, r.q_pos, r.slots,
                                   k_layer, v_layer, r.q_indptr, r.kv_indptr)

    def hidden(self) -> torch.Tensor:
        return self.rows.hidden


class CUDAGraphStep:
    """Replays the selective layers' step from CUDA graphs, one per layer, captured for
    one request shape.

    Give the same object to every ``blend`` of a request shape (``N`` tokens, ``M``
    selected rows); the first blend of a shape captures each selective layer's graph when
    it reaches it (a warm-up run of the step on the capture stream first), later ones only
    copy the rows' inputs into the graphs' static buffers and replay. Another shape drops
    the graphs and captures anew.

    The graphs read and write fixed memory, so the blend runs in this object's KV buffers
    (:meth:`kv_buffers`): a result's ``cache`` holds views of them and stays valid only
    until the next blend with this object. One request per blend (not ``blend_batch``).

    ``capture`` replaces CUDA graphs by another implementation of the same contract
    (``capture(fn)`` returns an object whose ``replay()`` runs what ``fn`` did, reading and
    writing the same tensors); the tests use one that defers ``fn`` to ``replay()``, so the
    runner's bookkeeping is exercised on the CPU. Without it, ``device`` must be a CUDA
    device.
    """

    def __init__(self, device, capture=None):
        device = torch.device(device)
        if capture is None and device.type != "cuda":
            raise ValueError(f"CUDAGraphStep: CUDA graphs need a CUDA device, got device {str(device)!r}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.capture_fn = capture or self.capture_cuda_graph
        self.kv = None  # (kbuf, vbuf) the graphs write into
        self.static = None  # SelectiveRows the graphs read (hidden: read and written)
        self.graphs = {}  # layer -> (graph, k_layer data_ptr)
        self.pool = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.captures = 0  # graphs captured so far (for reports and tests)
        self.replays = 0

    def kv_buffers(self, shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's KV buffers ``[L, H_kv, N, D]`` (the same tensors for every blend of a
        shape; a new shape drops the graphs)."""
        if self.kv is None or tuple(self.kv[0].shape) != tuple(shape) or self.kv[0].dtype != dtype:
            self.reset()
            k = torch.empty(shape, device=self.device, dtype=dtype)
            self.kv = (k, torch.empty_like(k))
        return self.kv

    def reset(self) -> None:
        """Drop the graphs and their buffers."""
        self.graphs, self.static, self.pool, self.kv = {}, None, None, None

    def start(self, decoder, rows: SelectiveRows) -> None:
        if rows.q_indptr is not None:
            raise ValueError("CUDAGraphStep runs one request per blend (blend, not blend_batch)")
        self.decoder = decoder
        s = self.static
        if s is None or any(a.shape != b.shape or a.dtype != b.dtype for a, b in
                            zip((s.hidden, s.cos, s.sin, s.q_pos), (rows.hidden, rows.cos, rows.sin, rows.q_pos))):
            self.graphs, self.pool = {}, None  # a new shape: capture again
            self.static = SelectiveRows(*(t.clone() for t in (rows.hidden, rows.cos, rows.sin, rows.q_pos)),
                                        None, None, None, rows.sizes)
            self.static.slots = self.static.q_pos
            return
        for dst, src in ((s.hidden, rows.hidden), (s.cos, rows.cos), (s.sin, rows.sin), (s.q_pos, rows.q_pos)):
            dst.copy_(src, non_blocking=True)

    def layer(self, l: int, k_layer: torch.Tensor, v_layer: torch.Tensor) -> None:
        entry = self.graphs.get(l)
        if entry is None:
            s, decoder, layer = self.static, self.decoder, self.decoder.layers[l]

            def step(s=s, decoder=decoder, layer=layer, k_layer=k_layer, v_layer=v_layer):
                s.hidden.copy_(selective_layer(decoder, layer, s.hidden, s.cos, s.sin, s.q_pos, s.slots,
                                               k_layer, v_layer))

            entry = self.graphs[l] = (self.capture_fn(step), k_layer.data_ptr(), v_layer.data_ptr())
            self.captures += 1
        graph, k_ptr, v_ptr = entry
        if (k_layer.data_ptr(), v_layer.data_ptr()) != (k_ptr, v_ptr):
            raise RuntimeError(f"CUDAGraphStep: layer {l}'s KV is not the buffer its graph was captured with "
                               "(blend with step=... runs in step.kv_buffers)")
        graph.replay()
        self.replays += 1

    def hidden(self) -> torch.Tensor:
        return self.static.hidden

    def capture_cuda_graph(self, step):
        """A CUDA graph of ``step()``: warmed up once on the capture stream (lazy
        initialisation stays out of the capture; the step's KV writes are the ones the
        replay makes again), then captured in this object's memory pool (layers replay in
        capture order, so they can share it). ``thread_local`` capture: a loader thread
        may use CUDA meanwhile."""
        stream, cur = self.stream, torch.cuda.current_stream(self.device)
        stream.wait_stream(cur)
        with torch.cuda.stream(stream):
            before = self.static.hidden.clone()
            step()
            self.static.hidden.copy_(before)  # the warm-up's output is not the replay's input
        cur.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
            step()
        if self.pool is None:
            self.pool = graph.pool()
        return graph
