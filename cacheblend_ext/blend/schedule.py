"""How much of a request is recomputed where: the compute budget of the published scheme
(:func:`published_cost`) and the :class:`Schedule` of check layers, kept tokens and probe
rows that fits a :class:`~cacheblend_ext.blend.config.BlendConfig` into it
(:func:`selection_schedule`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import BlendConfig, linear_schedule


def published_cost(num_tokens: int, num_forced: int, ratio: float, num_layers: int) -> int:
    """Token-layers the published scheme computes for a request: layer 0 for every token,
    then ``ceil(ratio * N)`` non-forced tokens plus the forced ones at each later layer."""
    if num_layers == 1:
        return num_tokens
    kept = min(num_tokens, num_forced + math.ceil(ratio * num_tokens - 1e-9))
    return num_tokens + (num_layers - 1) * kept


@dataclass(frozen=True)
class Schedule:
    """How a request is recomputed: the check layers it uses, how many non-forced tokens
    each keeps (forced tokens come on top) and how many rows the probe pass runs (0: none)."""

    layers: tuple[int, ...]
    picks: tuple[int, ...]
    probe_rows: int = 0


def selection_schedule(cfg: BlendConfig, num_tokens: int, num_forced: int, num_layers: int,
                       probe_rows: int = 0) -> Schedule:
    """The :class:`Schedule` of a request of ``num_tokens`` tokens, ``num_forced`` of them
    forced, whose ``"probe"`` selection would run ``probe_rows`` rows through
    ``cfg.probe_depth(num_layers)`` layers.

    With ``budget="ratio"`` each check layer keeps ``ceil(r_l * N)`` non-forced tokens. With
    ``budget="compute"`` the largest schedule of the configured shape whose token-layers
    (every token before the first check layer, then the kept tokens at each layer, plus the
    probe's rows at each layer it runs) fit in :func:`published_cost`; if even an empty selection
    does not fit, the first check layer moves earlier until it does (layer 1 keeps ratio 0
    equal to full KV reuse); ``recompute_ratio`` 0 selects nothing (full KV reuse) even
    where a schedule that starts at layer 0 could afford some tokens. A probe runs only when a selection has to rank tokens (some but
    not all candidates kept), or always with a ``target`` (it sets the budget); when the
    budget cannot pay for it, tokens are ranked by deviation instead.
    """
    free = max(num_tokens - num_forced, 0)

    def ranks(picks) -> bool:  # with a target the probe always runs: it sets the budget
        return (cfg.target is not None and free > 0) or any(0 < k < free for k in picks)

    if cfg.budget == "ratio":
        layers = tuple(cfg.check_layers)
        picks = tuple(min(free, math.ceil(r * num_tokens - 1e-9)) for r in cfg.ratios())
        return Schedule(layers, picks, probe_rows if probe_rows and ranks(picks) else 0)
    plain = _fit_schedule(cfg, num_tokens, num_forced, num_layers, extra_cost=0)
    if not (probe_rows and ranks(plain.picks)):
        return plain
    probed = _fit_schedule(cfg, num_tokens, num_forced, num_layers, extra_cost=probe_rows * cfg.probe_depth(num_layers))
    if not any(probed.picks):
        return plain
    return Schedule(probed.layers, probed.picks, probe_rows)


def _fit_schedule(cfg: BlendConfig, n: int, num_forced: int, num_layers: int, extra_cost: int) -> Schedule:
    """The compute-budget schedule (see :func:`selection_schedule`) with ``extra_cost``
    token-layers spent elsewhere."""
    free = max(n - num_forced, 0)
    layers = tuple(cfg.check_layers)
    shape = cfg.ratios()
    budget = published_cost(n, num_forced, cfg.recompute_ratio, num_layers) - extra_cost

    def picks(final: int) -> tuple[int, ...]:
        if cfg.check_ratios is None:
            sched = linear_schedule(final / n, len(layers))
        else:
            last = shape[-1]
            sched = tuple(min(1.0, r / last * final / n) if last > 0 else (1.0 if r > 0 else 0.0) for r in shape)
            sched = sched[:-1] + (final / n,)
        return tuple(min(free, max(final, math.ceil(r * n - 1e-9))) for r in sched)

    def cost(ks: tuple[int, ...], lays: tuple[int, ...]) -> int:
        bounds = lays[1:] + (num_layers,)
        return lays[0] * n + sum((b - a) * min(n, num_forced + k) for k, a, b in zip(ks, lays, bounds))

    lays = layers
    while cost(picks(0), lays) > budget and lays[0] > min(1, num_layers - 1):
        first = lays[0] - 1
        lays = tuple(sorted({first, *(l for l in lays[1:] if l > first)}))
    if cfg.recompute_ratio == 0:  # ratio 0 is full KV reuse, whatever a cheaper schedule could afford
        return Schedule(lays, picks(0))
    lo, hi = 0, free
    while lo < hi:  # the largest final count whose schedule fits (cost grows with it)
        mid = (lo + hi + 1) // 2
        if cost(picks(mid), lays) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return Schedule(lays, picks(lo))
