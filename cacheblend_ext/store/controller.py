"""Loading controller (CacheBlend paper, section 5.1).

When the KV of the reused chunks is loaded layer by layer while the previous layer is
recomputed, a request costs about ``max(recompute, load)`` per layer. With ``N`` tokens
and recompute ratio ``r``:

* ``recompute(r, N) = r * prefill_layer(N)``, where ``prefill_layer(N)`` is the measured
  time of one layer of a full prefill of ``N`` tokens (fitted as ``a*N + b*N^2``: the
  projections and MLP are linear in ``N``, attention quadratic; selective recompute of
  ``r*N`` queries against ``N`` keys scales both terms by ``r``);
* ``load(tier, N) = N * kv_bytes_per_layer_token / throughput(tier)``.

Two decisions follow:

* **ratio for a tier**: ``r = max(r_quality, r_load)`` where ``r_load`` makes recompute
  time equal load time (recomputing more than the quality needs is free while the load
  dominates anyway). If ``r_load > 1`` the load cannot be hidden even by a full prefill;
  the decision then says so (``hidden=False``) and a full prefill is at least as fast.
* **tier for a ratio**: the cheapest tier (by a cost order, default remote < disk < cpu <
  gpu) whose load time is hidden by the recompute at that ratio; the fastest tier if none is.

:func:`measure_prefill` times the model, :func:`measure_tier_throughput` times the real
store loading path per tier, and :meth:`LoadingController.calibrate` does both once and
caches the numbers in a JSON file (keyed by model identity, device and dtype).
:meth:`LoadingController.observe` keeps learning each tier's throughput from the load
reports of real requests (``CachedBlender(controller=...)`` feeds it every request), so a
remote tier whose network gets slower or faster moves the decisions with it. Every
decision is a :class:`LoadingDecision` carrying its inputs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

DEFAULT_TIER_COST = {"remote": 0.5, "disk": 1.0, "cpu": 2.0, "gpu": 3.0}


@dataclass
class Measurements:
    """Inputs of the controller.

    ``prefill_a_ms`` / ``prefill_b_ms``: one layer of a full prefill of ``N`` tokens takes
    ``a*N + b*N^2`` ms. ``kv_bytes_per_layer_token``: bytes of K+V per token and layer.
    ``tier_gbps``: load throughput per tier in GB/s (``inf``: no load, e.g. KV already on
    the compute device).
    """

    prefill_a_ms: float
    kv_bytes_per_layer_token: int
    tier_gbps: dict
    prefill_b_ms: float = 0.0
    num_layers: int = 0
    device: str = ""
    dtype: str = ""
    model_id: str = ""
    samples: dict = field(default_factory=dict)

    def prefill_layer_ms(self, num_tokens: int) -> float:
        return self.prefill_a_ms * num_tokens + self.prefill_b_ms * num_tokens * num_tokens

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tier_gbps"] = {k: (None if math.isinf(v) else v) for k, v in self.tier_gbps.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Measurements":
        d = dict(d)
        d["tier_gbps"] = {k: (math.inf if v is None else float(v)) for k, v in d["tier_gbps"].items()}
        return cls(**d)


@dataclass
class LoadingDecision:
    """A controller decision and everything it was computed from (times per layer, ms)."""

    ratio: float
    tier: str
    num_tokens: int
    r_quality: float
    r_load: float
    recompute_ms_per_layer: float
    load_ms_per_layer: float
    hidden: bool
    reason: str
    inputs: dict

    @property
    def expected_layer_ms(self) -> float:
        """Per-layer time with pipelining: the slower of recompute and load."""
        return max(self.recompute_ms_per_layer, self.load_ms_per_layer)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["expected_layer_ms"] = self.expected_layer_ms
        return d


class LoadingController:
    """Chooses the recompute ratio or the storage tier from measured costs."""

    def __init__(self, measurements: Measurements, r_quality: float = 0.15, tier_cost: dict | None = None):
        if not 0.0 <= r_quality <= 1.0:
            raise ValueError(f"r_quality must be in [0, 1], got {r_quality}")
        if measurements.prefill_a_ms < 0 or measurements.prefill_b_ms < 0:
            raise ValueError("prefill time coefficients must be non-negative")
        if measurements.prefill_layer_ms(1) <= 0 and measurements.prefill_b_ms <= 0:
            raise ValueError("prefill time per layer and token must be positive")
        self.m = measurements
        self.r_quality = float(r_quality)
        self.tier_cost = dict(tier_cost or DEFAULT_TIER_COST)

    # -- arithmetic ------------------------------------------------------------
    def recompute_ms(self, ratio: float, num_tokens: int) -> float:
        """Per-layer recompute time at ``ratio`` for ``num_tokens`` tokens."""
        return ratio * self.m.prefill_layer_ms(num_tokens)

    def load_ms(self, tier: str, num_tokens: int) -> float:
        """Per-layer load time of ``num_tokens`` tokens' KV from ``tier``."""
        try:
            gbps = self.m.tier_gbps[tier]
        except KeyError:
            raise ValueError(f"no throughput measured for tier {tier!r} (have: {sorted(self.m.tier_gbps)})") from None
        if math.isinf(gbps):
            return 0.0
        if gbps <= 0:
            return math.inf
        return num_tokens * self.m.kv_bytes_per_layer_token / (gbps * 1e9) * 1e3

    def r_load(self, tier: str, num_tokens: int) -> float:
        """The ratio whose recompute time equals the load time from ``tier``."""
        return self.load_ms(tier, num_tokens) / self.m.prefill_layer_ms(num_tokens)

    # -- decisions -------------------------------------------------------------
    def choose_ratio(self, num_tokens: int, tier: str, r_quality: float | None = None) -> LoadingDecision:
        """Recompute ratio for KV stored in ``tier``: ``max(r_quality, r_load)``, capped at 1."""
        rq = self.r_quality if r_quality is None else float(r_quality)
        rl = self.r_load(tier, num_tokens)
        ratio = min(1.0, max(rq, rl))
        load = self.load_ms(tier, num_tokens)
        recompute = self.recompute_ms(ratio, num_tokens)
        hidden = load <= recompute * (1 + 1e-9)
        if rl > 1.0:
            reason = (f"loading from {tier} ({load:.3g} ms/layer) is slower than a full prefill "
                      f"({self.m.prefill_layer_ms(num_tokens):.3g} ms/layer): it cannot be hidden")
        elif rl > rq:
            reason = f"r_load {rl:.3f} > r_quality {rq:.3f}: recomputing more costs nothing while {tier} loads"
        else:
            reason = f"r_quality {rq:.3f} >= r_load {rl:.3f}: loading from {tier} is hidden by the recompute"
        return LoadingDecision(ratio, tier, int(num_tokens), rq, rl, recompute, load, hidden, reason,
                               self.m.as_dict())

    def choose_tier(self, num_tokens: int, ratio: float | None = None,
                    tiers: Sequence[str] | None = None) -> LoadingDecision:
        """Cheapest tier whose loading is hidden by recompute at ``ratio`` (default r_quality)."""
        ratio = self.r_quality if ratio is None else float(ratio)
        candidates = [t for t in (tiers if tiers is not None else self.m.tier_gbps) if t in self.m.tier_gbps]
        if not candidates:
            raise ValueError("no candidate tier has a measured throughput")
        recompute = self.recompute_ms(ratio, num_tokens)
        by_cost = sorted(candidates, key=lambda t: (self.tier_cost.get(t, math.inf), t))
        for tier in by_cost:
            load = self.load_ms(tier, num_tokens)
            if load <= recompute * (1 + 1e-9):
                reason = (f"{tier} is the cheapest tier whose load ({load:.3g} ms/layer) is hidden by "
                          f"recompute at ratio {ratio:.3f} ({recompute:.3g} ms/layer)")
                return LoadingDecision(ratio, tier, int(num_tokens), self.r_quality, self.r_load(tier, num_tokens),
                                       recompute, load, True, reason, self.m.as_dict())
        tier = min(candidates, key=lambda t: self.load_ms(t, num_tokens))
        load = self.load_ms(tier, num_tokens)
        reason = (f"no tier is hidden at ratio {ratio:.3f} ({recompute:.3g} ms/layer); {tier} loads fastest "
                  f"({load:.3g} ms/layer)")
        return LoadingDecision(ratio, tier, int(num_tokens), self.r_quality, self.r_load(tier, num_tokens),
                               recompute, load, False, reason, self.m.as_dict())

    # -- learning from requests --------------------------------------------------
    def observe(self, report, weight: float = 0.3) -> dict:
        """Update each tier's throughput from a request's load report
        (:class:`cacheblend_ext.store.pipeline.LoadReport`: bytes and read time per tier) as an
        exponential moving average with ``weight`` for the new sample; a tier seen for the
        first time takes the sample. Returns the samples used, GB/s per tier."""
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        samples = {}
        for tier, nbytes in (getattr(report, "tier_bytes", None) or {}).items():
            ms = report.tier_load_ms.get(tier, 0.0)
            if nbytes <= 0 or ms <= 0:
                continue
            gbps = nbytes / (ms * 1e-3) / 1e9
            old = self.m.tier_gbps.get(tier)
            self.m.tier_gbps[tier] = gbps if old is None or math.isinf(old) else (1 - weight) * old + weight * gbps
            samples[tier] = gbps
        return samples

    # -- calibration -----------------------------------------------------------
    @classmethod
    def calibrate(cls, model, *, device=None, dtype=None, tiers: Sequence[str] = ("gpu", "cpu", "disk"),
                  disk_dir: str | os.PathLike | None = None, remote=None, sizes: Sequence[int] = (128, 512),
                  cache_dir: str | os.PathLike | None = None, refresh: bool = False, r_quality: float = 0.15,
                  model_id: str | None = None) -> "LoadingController":
        """Measure ``model``'s prefill time and the tiers' load throughput once, cache them.

        The cache file lives in ``cache_dir`` (default ``$CACHEBLEND_CACHE`` or
        ``~/.cache/cacheblend``) under ``controller/``, keyed by the model identity, the
        device name and the dtype; ``refresh=True`` measures again. Add ``"remote"`` to
        ``tiers`` (with ``remote``, a Redis URL or client) to measure the remote tier.
        """
        from ..identity import model_identity

        if "remote" in tiers and remote is None:
            raise ValueError("calibrating the remote tier needs remote= (a Redis URL or client)")

        param = next(model.parameters())
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        cfg = model.config
        num_layers = int(cfg.num_hidden_layers)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        kv_bytes = 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        mid = model_id or model_identity(model)
        path = _cache_path(cache_dir, mid, device, dtype, disk_dir, remote if "remote" in tiers else None)
        if path.exists() and not refresh:
            try:
                return cls(Measurements.from_dict(json.loads(path.read_text())), r_quality)
            except (ValueError, KeyError, TypeError):
                pass  # unreadable cache: measure again
        vocab = int(cfg.vocab_size)

        def prefill(n: int) -> None:
            ids = torch.randint(0, vocab, (1, n), device=device)
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

        a, b, samples = measure_prefill(prefill, num_layers, sizes, device)
        gbps = {t: measure_tier_throughput(t, device, dtype, disk_dir=disk_dir, remote=remote) for t in tiers}
        m = Measurements(a, kv_bytes, gbps, b, num_layers, str(device), str(dtype).replace("torch.", ""), mid,
                         {"prefill_layer_ms": {str(k): v for k, v in samples.items()}})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(m.as_dict(), indent=1))
            os.replace(tmp, path)
        except OSError:
            pass
        return cls(m, r_quality)


def _cache_path(cache_dir, model_id: str, device, dtype, disk_dir, remote=None) -> Path:
    from ..identity import hash_hex

    root = Path(cache_dir or os.environ.get("CACHEBLEND_CACHE") or Path.home() / ".cache" / "cacheblend")
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu{torch.get_num_threads()}"
    disk = str(os.stat(disk_dir).st_dev) if disk_dir is not None and os.path.exists(disk_dir) else "tmp"
    where = remote if isinstance(remote, str) or remote is None else type(remote).__name__
    key = hash_hex([model_id.encode(), name.encode(), str(dtype).encode(), disk.encode(), str(where).encode()], 10)
    return root / "controller" / f"{key}.json"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_prefill(prefill: Callable[[int], object], num_layers: int, sizes: Sequence[int] = (128, 512),
                    device="cpu", reps: int = 3) -> tuple[float, float, dict]:
    """Time ``prefill(n)`` (a full prefill of ``n`` tokens) and fit one layer's time as
    ``a*n + b*n^2`` ms (non-negative least squares over ``sizes``; ``b = 0`` with one size).
    Returns ``(a, b, {n: per-layer ms})``."""
    samples = {}
    for n in sizes:
        prefill(n)  # warm-up
        _sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            prefill(n)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        samples[int(n)] = statistics.median(times) / num_layers
    a, b = fit_prefill(samples)
    return a, b, samples


def fit_prefill(samples: dict) -> tuple[float, float]:
    """Non-negative least-squares fit of ``t(n) = a*n + b*n^2`` to ``{n: t}``."""
    ns = [float(n) for n in samples]
    ts = [float(samples[n]) for n in samples]
    a_only = sum(t * n for n, t in zip(ns, ts)) / sum(n * n for n in ns)
    if len(ns) < 2:
        return a_only, 0.0
    s22 = sum(n ** 2 for n in ns)
    s23 = sum(n ** 3 for n in ns)
    s33 = sum(n ** 4 for n in ns)
    s1 = sum(t * n for n, t in zip(ns, ts))
    s2 = sum(t * n * n for n, t in zip(ns, ts))
    det = s22 * s33 - s23 * s23
    if det <= 0:
        return a_only, 0.0
    a = (s1 * s33 - s2 * s23) / det
    b = (s22 * s2 - s23 * s1) / det
    if a < 0 or b < 0:  # fall back to the best single-term fit
        b_only = s2 / s33
        err_a = sum((t - a_only * n) ** 2 for n, t in zip(ns, ts))
        err_b = sum((t - b_only * n * n) ** 2 for n, t in zip(ns, ts))
        return (a_only, 0.0) if err_a <= err_b else (0.0, b_only)
    return a, b


def measure_tier_throughput(tier: str, device, dtype=torch.bfloat16, *, disk_dir=None, remote=None,
                            num_layers: int = 8, tokens: int = 2048, heads: int = 8, head_dim: int = 128,
                            reps: int = 3) -> float:
    """Load throughput in GB/s of ``tier`` into ``device`` through the store's real
    loading path (``inf`` when the KV is used where it lies). Disk reads are cold: the
    file is written with ``fsync`` and dropped from the page cache before each read,
    one layer at a time. The remote tier (``remote``: a Redis URL or client) is read the
    way requests read it, with its layer requests pipelined; its calibration value is
    written under its own namespace and deleted afterwards."""
    from .pipeline import StoreLayerSource
    from .chunk_store import ChunkStore

    device = torch.device(device)
    if tier == "gpu" or (tier == "cpu" and device.type == "cpu"):
        return math.inf
    if tier not in ("cpu", "disk", "remote"):
        raise ValueError(f"unknown tier {tier!r}")
    if tier == "remote" and remote is None:
        raise ValueError("measuring the remote tier needs remote= (a Redis URL or client)")
    kv = torch.randn(num_layers, 2, tokens, heads, head_dim).to(dtype)
    nbytes = kv.numel() * kv.element_size()
    with tempfile.TemporaryDirectory(dir=disk_dir, prefix="cacheblend-calib-") as tmp:
        store = ChunkStore("calibration", "calibration", disk_dir=tmp if tier == "disk" else None,
                           cpu_bytes=2 * nbytes if tier == "cpu" else 0, fsync=True,
                           remote=remote if tier == "remote" else None,
                           remote_namespace=f"cacheblend-calibration-{os.getpid()}")
        scope = "calibration"  # a scope of its own: no request ever looks it up
        key = store.put("calibration", kv, torch.arange(tokens), scope=scope)
        del kv
        times = []
        try:
            for _ in range(reps):
                if tier == "disk":
                    drop_page_cache(store.chunk_path(key, scope=scope))
                handle = store.open(key, scope=scope)
                if handle is None:
                    raise RuntimeError(f"the {tier} tier did not return the calibration chunk")
                _sync(device)
                t0 = time.perf_counter()
                source = StoreLayerSource([handle], device, pipelined=tier == "remote")
                for l in range(num_layers):
                    source.layer(l)
                _sync(device)
                times.append(time.perf_counter() - t0)
                source.close()
        finally:
            store.remove(key, scope=scope)
            store.close()
    return nbytes / statistics.median(times) / 1e9


def drop_page_cache(path) -> None:
    """Write ``path`` out and evict it from the page cache, so the next read comes from the
    disk (cold-read measurements; a no-op where ``posix_fadvise`` is missing)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError:
        pass


__all__ = ["LoadingController", "LoadingDecision", "Measurements", "drop_page_cache", "fit_prefill",
           "measure_prefill", "measure_tier_throughput"]
