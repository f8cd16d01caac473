"""Shared fixtures: devices, dtypes, tolerances and output poisoning."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from torch.utils import cpp_extension

import cacheblend_ext  # noqa: F401  (fails early if the extension is not built)

HAS_CUDA = torch.cuda.is_available() and cacheblend_ext.has_cuda_kernels()

# CPU always; CUDA cases are generated too and skipped only when no GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or CUDA kernels not built)")),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Max abs error vs a float64 reference, relative to the reference's scale: one
# rounding of the result to the storage dtype dominates.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output with NaN so any element a kernel fails to write is caught."""
    return t.fill_(float("nan"))


def assert_close_to_ref(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float | None = None,
                        factor: float = 1.0) -> None:
    """``max|actual - ref| <= rtol(dtype) * factor * scale`` with ``scale`` = max|ref| by default; NaN fails."""
    actual64 = actual.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    assert actual64.shape == ref64.shape, (actual64.shape, ref64.shape)
    assert not torch.isnan(actual64).any(), "output has NaN (unwritten or invalid elements)"
    if scale is None:
        scale = max(ref64.abs().max().item(), 1e-30) if ref64.numel() else 1.0
    err = (actual64 - ref64).abs().max().item() if ref64.numel() else 0.0
    tol = RTOL[dtype] * factor * scale
    assert err <= tol, f"max abs error {err:.3e} > tolerance {tol:.3e} ({dtype})"


def request_parts(seed=0, sizes=(19, 26, 13), vocab=160):
    """A random RAG request for the tiny test models: prefix ids, chunk ids, query ids."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.tensor([1, 7, 9])
    chunks = [torch.randint(3, vocab, (n,), generator=g) for n in sizes]
    query = torch.randint(3, vocab, (8,), generator=g)
    return prefix, chunks, query


@pytest.fixture(scope="session")
def emulated_kernels():
    """Every CUDA kernel compiled for the host, run in the CUDA emulator
    (csrc/emulation/) through the CUDA wrappers' own launch code; CPU tensors in and out.
    Built on first use (about 30 s; cached by torch after that)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    csrc = root / "csrc"
    config = json.loads((csrc / "build_config.json").read_text())["emulation"]
    return cpp_extension.load(
        name="cacheblend_kernels_emulated",
        sources=[str(csrc / "emulation" / "kernels_emulated.cpp")],
        extra_include_paths=[str(csrc)],
        # The emulator plugs into the kernels from the build: a forced include (the kernel
        # headers do not include it).
        extra_cflags=config["cxx_flags"] + ["-include", str(csrc / config["forced_include"])],
        verbose=bool(os.environ.get("CACHEBLEND_VERBOSE_BUILD")),
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------- Redis
# Private redis-server processes on 127.0.0.1 (free ports, own data directories). In CI
# (CI=1 or CACHEBLEND_REQUIRE_REDIS=1) a missing server fails the tests; elsewhere they skip.

def _redis_required() -> bool:
    flags = (os.environ.get("CI", ""), os.environ.get("CACHEBLEND_REQUIRE_REDIS", ""))
    return any(f.strip().lower() not in ("", "0", "false", "no") for f in flags)


def _need_redis(server: bool = True):
    from cacheblend_ext.testing.redis_server import INSTALL_HINT, unavailable_reason

    try:
        import redis  # noqa: F401
        reason = unavailable_reason() if server else None
    except ImportError:
        reason = f"the redis Python client is not installed: {INSTALL_HINT}"
    if reason is not None:
        if _redis_required():
            pytest.fail(f"Redis tests are required here (CI / CACHEBLEND_REQUIRE_REDIS) but {reason}")
        pytest.skip(reason)


@pytest.fixture
def redis_client_module():
    """The redis client library (tests that need no server, e.g. one that is absent)."""
    _need_redis(server=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One private redis-server for the session (flushed before each test by ``redis_url``)."""
    _need_redis()
    from cacheblend_ext.testing.redis_server import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path):
    """A server of the test's own (to kill, pause or fill), stopped afterwards."""
    _need_redis()
    from cacheblend_ext.testing.redis_server import RedisServer

    servers = []

    def start(**kwargs):
        servers.append(RedisServer(tmp_path / f"redis{len(servers)}", **kwargs).start())
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A throw-away CA with a server (127.0.0.1) and a client certificate, made by openssl."""
    _need_redis()
    from cacheblend_ext.testing.tls import OPENSSL_HINT, find_openssl, make_test_certificates

    if find_openssl() is None:
        reason = f"the openssl command is not installed: {OPENSSL_HINT}"
        if _redis_required():
            pytest.fail(f"TLS tests are required here (CI / CACHEBLEND_REQUIRE_REDIS) but {reason}")
        pytest.skip(reason)
    return make_test_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A 3-node Redis Cluster on 127.0.0.1 for the session."""
    _need_redis()
    from cacheblend_ext.testing.redis_server import RedisTestCluster

    with RedisTestCluster(tmp_path_factory.mktemp("rcluster")) as cluster:
        yield cluster
