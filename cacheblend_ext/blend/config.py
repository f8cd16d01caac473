"""What a blend does: :class:`BlendConfig`, the recompute budget and the selection scheme,
with the accepted value of each option."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEVIATIONS = ("k", "v", "kv")
SELECTIONS = ("deviation", "impact", "probe")
QUOTAS = ("global", "per_chunk", "relevance")
PROBE_SCORES = ("attention", "value", "depth")
RECOMPUTE_CONTEXTS = ("full", "restricted")
BUDGETS = ("compute", "ratio")
CHUNK_PREFIXES = ("bos", "none", "prefix")


@dataclass
class BlendConfig:
    """Blend settings. The defaults are the best scheme measured on the project's quality
    set (docs/benchmarks.md, "Quality"); :meth:`published` is the scheme of the CacheBlend paper.

    Budget
    - ``recompute_ratio``: the recompute budget ``r``. The published scheme recomputes layer
      0 for every token, then ``ceil(r * N)`` non-forced tokens plus every forced token at
      each later layer; that many token-layers is the request's budget.
    - ``budget``: ``"compute"`` (default) makes every scheme spend at most that budget:
      extra full layers (a later first check layer), wider early selections (gradual
      filtering) and chunk-boundary tokens are paid from it, so schemes compare at equal
      compute. ``"ratio"`` applies the ratios literally: each check layer keeps
      ``ceil(r_l * N)`` non-forced tokens, whatever the schedule costs.

    The defaults: ``"probe"`` selection at check layer 0 (no full layer is spent before
    it), chunks encoded after BOS, everything inside the published scheme's compute at the
    same ratio.

    Selection
    - ``check_layers``: layers where selection happens (ascending). ``(1,)`` is the
      published scheme, ``(0,)`` the default; several give gradual filtering (each selects from the previous
      selection). Under the compute budget a first check layer the budget cannot pay for
      moves earlier (to layer 1 at ratio 0, so ratio 0 stays full KV reuse).
    - ``check_ratios``: per check layer ratio, not increasing; None gives a linear schedule
      from ``min(1, 2r)`` down to ``r`` (just ``r`` for one layer). Under the compute budget
      only their proportions count: the schedule is scaled to fit the budget.
    - ``deviation``: what deviation ranks tokens by: ``"k"``, ``"v"`` or ``"kv"`` (sum), the
      squared distance between the fresh and the reused K (V) over heads and dims.
    - ``selection``: how candidates are ranked.
      ``"deviation"`` (published): by deviation alone.
      ``"impact"``: deviation times the attention mass that the query tokens (forced tokens
      after the last reused chunk) put on each token at the check layer, since a query's
      output error is roughly the attention-weighted sum of the errors of the tokens it reads.
      ``"probe"``: a probe pass first runs the last ``probe_tokens`` query tokens through
      every layer over the reused chunk KV alone (full KV reuse for those rows only), and
      tokens are ranked by the attention mass the probe puts on them, summed over the
      layers from the check layer on: the tokens whose KV the query actually reads where
      the selection takes effect. The probe's token-layers are paid from the budget; it
      needs the reused KV of the layers it runs before the first check layer (see the
      layer-source protocol).
    - ``probe_layers``: how many layers the probe runs, from layer 0 (None: every layer).
      Its cost is a read of those layers' weights for a few rows, so fewer layers make it
      cheaper, and the rest of the reused KV then loads behind the recompute; the ranking
      sums the attention of the layers it ran. Must exceed the last check layer.
    - ``probe_prefix`` (probe selection): the probe pass also runs the forced tokens
      before the first reused chunk (the prefix: system prompt, instructions), so the probe
      rows see the prefix's KV, as a full prefill's query does (its first token is the
      attention sink). Without it the probe sees only the reused chunks and its own rows,
      and the attention the sink would take spills onto chunk tokens. The prefix rows are
      charged to the budget like the probe's own rows.
    - ``quota``: ``"global"`` takes the top tokens of the whole request; ``"per_chunk"``
      gives each reused chunk a share of the budget proportional to its candidates;
      ``"relevance"`` (chunk-anchor probing) gives each chunk a share proportional to its
      relevance to the query, the summed score of its ``anchor_tokens`` highest-scored
      tokens (its anchors), then takes each chunk's top tokens.
    - ``boundary_tokens``: the first ``b`` tokens of each reused chunk are taken first,
      inside the budget (each chunk was encoded alone, so its first tokens were attention
      sinks).
    - ``probe_score`` (probe selection): what a token's probe score sums, over probe rows,
      heads and layers: ``"attention"`` the attention it receives; ``"value"`` that times
      the norm of its reused V in the head (what it adds to the probe's attention output);
      ``"depth"`` the attention weighted by ``(l + 1) / L`` at layer ``l`` (reused KV
      drifts further from a full prefill's the deeper the layer).
    - ``crowding`` (crowding-out-aware ranking): a token with a higher-scored token within
      ``crowding_window`` positions of it in the same chunk has its score multiplied by
      ``1 - crowding``: recomputing the neighbour already fixes much of what the query
      reads there, so the budget spreads over more places. 0 (off) to 1.
    - ``span``: the opposite bet: a token's score is at least ``span`` times the highest
      score within ``crowding_window`` positions of it in the same chunk, so the
      neighbours of a peak are recomputed with it. 0 (off) to 1.

    Recompute
    - ``recompute_context``: what a recomputed chunk token attends to. ``"full"``: every
      key before it, fresh or reused. ``"restricted"``: its own chunk's keys, the forced
      tokens' and the other chunks' recomputed tokens' (fresh) keys, but not the other
      chunks' reused (stale, never cross-attended) keys. Forced tokens (the query) always
      see every key.
    - ``reused_logit_scale`` (APE-style attention rescaling): from layer 1 on (layer 0's
      reused KV is exact), the logits of every query against the reused keys that were not
      recomputed are multiplied by this factor (an inverse temperature, applied by scaling
      those K rows, so decoding from the blended cache sees it too). 1.0 is off.

    Adaptive budget
    - ``target``: if set, each request chooses its own recompute budget instead of
      ``recompute_ratio``: after the probe, the fewest tokens whose recompute leaves at most
      ``target`` of the probe's attention (summed over probe rows, heads and the layers
      from the check layer on) on reused tokens that stay stale. The count is held between
      the kept counts of ``ratio_floor`` and ``ratio_ceiling`` under the compute budget.
      Needs ``selection="probe"`` and one check layer.

    Reuse
    - ``chunk_prefix``: what a chunk is encoded after, its KV then dropped: ``"bos"`` (the
      tokenizer's BOS token), ``"none"`` (the chunk alone at position 0) or ``"prefix"``
      (the request's own prefix, e.g. the system prompt: the chunk's KV then starts from
      the context it will be used in, and a chunk right after the prefix is exact).
      ``"prefix"`` needs an encoder that knows the prefix (:class:`CachedBlender`, or
      ``encode_chunk(segment, context=prefix)``); without one a chunk is encoded after BOS.
      The context is part of the chunk's key, so chunks encoded after one system prompt
      are not reused under another.
    - ``fresh_check_kv``: a check layer computes fresh K/V for all its candidates anyway;
      True keeps them for every candidate (not only the selected tokens) in the request's
      KV at that layer. No extra compute; with it, ratio 0 no longer equals full KV reuse
      at the check layers.
    """

    recompute_ratio: float = 0.15
    check_layers: tuple[int, ...] = (0,)
    check_ratios: tuple[float, ...] | None = None
    deviation: str = "k"
    selection: str = "probe"
    quota: str = "global"
    probe_tokens: int = 8
    probe_layers: int | None = None
    probe_prefix: bool = False
    boundary_tokens: int = 0
    budget: str = "compute"
    chunk_prefix: str = "bos"
    fresh_check_kv: bool = False
    probe_score: str = "attention"
    anchor_tokens: int = 16
    crowding: float = 0.0
    span: float = 0.0
    crowding_window: int = 2
    recompute_context: str = "full"
    reused_logit_scale: float = 1.0
    target: float | None = None
    ratio_floor: float = 0.05
    ratio_ceiling: float = 0.5

    @classmethod
    def published(cls, recompute_ratio: float = 0.15) -> "BlendConfig":
        """The published CacheBlend scheme: K deviation at one check layer (layer 1), global top-k."""
        return cls(recompute_ratio=recompute_ratio, check_layers=(1,), check_ratios=None, deviation="k",
                   selection="deviation", quota="global", boundary_tokens=0, budget="ratio", chunk_prefix="bos",
                   fresh_check_kv=False, probe_prefix=False, probe_score="attention", crowding=0.0, span=0.0,
                   recompute_context="full", reused_logit_scale=1.0, target=None)

    def replace(self, **changes) -> "BlendConfig":
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def ratios(self) -> tuple[float, ...]:
        """The configured per-check-layer ratios (before any compute-budget scaling)."""
        n = len(self.check_layers)
        if self.check_ratios is not None:
            if len(self.check_ratios) != n:
                raise ValueError(f"check_ratios has {len(self.check_ratios)} entries for {n} check layers")
            return tuple(float(r) for r in self.check_ratios)
        return linear_schedule(float(self.recompute_ratio), n)

    def __post_init__(self) -> None:
        self.check_values()

    def validate(self, num_layers: int) -> None:
        """Every option, including those that depend on the model's depth (a ValueError
        or TypeError naming the option)."""
        self.check_values()
        layers = self.check_layers
        if layers[-1] >= num_layers:
            raise ValueError(f"check_layers {layers} out of range for a {num_layers}-layer model")
        if self.probe_layers is not None and self.selection == "probe" and self.probe_layers <= layers[-1]:
            raise ValueError(f"probe_layers ({self.probe_layers}) must exceed the last check layer ({layers[-1]}): "
                             "the ranking reads the probe's attention from the check layer on")

    def check_values(self) -> None:
        """The options that do not depend on the model, checked when a config is made."""
        if not _is_number(self.recompute_ratio) or not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be a number in [0, 1], got {self.recompute_ratio!r}")
        if isinstance(self.check_layers, (str, bytes)) or not hasattr(self.check_layers, "__iter__"):
            raise TypeError(f"check_layers must be a tuple of layer indices, got {self.check_layers!r}")
        layers = tuple(self.check_layers)
        if not layers or not all(_is_int(l) and l >= 0 for l in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"check_layers must be non-empty, non-negative ints, strictly ascending, got {layers}")
        self.check_layers = layers
        if self.check_ratios is not None:
            if isinstance(self.check_ratios, (str, bytes)) or not hasattr(self.check_ratios, "__iter__"):
                raise TypeError(f"check_ratios must be a tuple of numbers or None, got {self.check_ratios!r}")
            self.check_ratios = tuple(self.check_ratios)
            if not all(_is_number(r) for r in self.check_ratios):
                raise ValueError(f"check_ratios must be numbers, got {self.check_ratios}")
        ratios = self.ratios()
        if any(not 0.0 <= r <= 1.0 for r in ratios) or any(a < b for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"check_ratios must lie in [0, 1] and not increase, got {ratios}")
        for name, value, allowed in (("deviation", self.deviation, DEVIATIONS),
                                     ("selection", self.selection, SELECTIONS), ("quota", self.quota, QUOTAS),
                                     ("budget", self.budget, BUDGETS),
                                     ("chunk_prefix", self.chunk_prefix, CHUNK_PREFIXES),
                                     ("probe_score", self.probe_score, PROBE_SCORES),
                                     ("recompute_context", self.recompute_context, RECOMPUTE_CONTEXTS)):
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if not _is_int(self.boundary_tokens) or self.boundary_tokens < 0:
            raise ValueError(f"boundary_tokens must be a non-negative int, got {self.boundary_tokens!r}")
        for name in ("probe_tokens", "anchor_tokens", "crowding_window"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("probe_prefix", "fresh_check_kv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("crowding", "span", "ratio_floor", "ratio_ceiling"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not _is_number(self.reused_logit_scale) or not 0.0 < self.reused_logit_scale <= 4.0:
            raise ValueError(f"reused_logit_scale must be a number in (0, 4], got {self.reused_logit_scale!r}")
        if self.ratio_floor > self.ratio_ceiling:
            raise ValueError(f"ratio_floor ({self.ratio_floor}) must not exceed ratio_ceiling ({self.ratio_ceiling})")
        if self.target is not None:
            if not _is_number(self.target) or not 0.0 <= self.target <= 1.0:
                raise ValueError(f"target must be a number in [0, 1] (the share of the probe's attention left on "
                                 f"stale tokens) or None, got {self.target!r}")
            if self.selection != "probe" or len(layers) != 1:
                raise ValueError(f"target needs selection='probe' and one check layer, got selection="
                                 f"{self.selection!r} and check_layers {layers}")
        if self.probe_layers is not None and (not _is_int(self.probe_layers) or self.probe_layers < 1):
            raise ValueError(f"probe_layers must be a positive int or None, got {self.probe_layers!r}")

    def probe_depth(self, num_layers: int) -> int:
        """The layers the probe runs in a ``num_layers``-layer model."""
        return num_layers if self.probe_layers is None else min(self.probe_layers, num_layers)


def _is_number(value) -> bool:
    """A real number that is not a bool and not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def linear_schedule(r: float, n: int) -> tuple[float, ...]:
    """``n`` check-layer ratios falling linearly from ``min(1, 2r)`` to ``r`` (``(r,)`` for one)."""
    if n == 1:
        return (r,)
    top = min(1.0, 2 * r)
    return tuple(top + (r - top) * i / (n - 1) for i in range(n))
