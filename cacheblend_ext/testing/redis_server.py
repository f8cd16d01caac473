"""Private Redis servers on 127.0.0.1 for tests, benchmarks and local trials.

:class:`RedisServer` starts ``redis-server`` (Debian package ``redis-server``) on a free
loopback port with its own data directory, no persistence and, optionally, a
``maxmemory`` with an LRU policy, TLS only (certificates from
:func:`cacheblend_ext.testing.tls.make_test_certificates`), a password for the default
user and ACL users; :class:`RedisTestCluster` starts three such servers as a Redis Cluster
(all 16,384 slots spread over them, no replicas; over TLS too, bus included). Both stop
their processes on :meth:`stop` (or at the end of a ``with`` block) and never touch a
server that was already running on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = ("install it with `apt-get install -y redis-server` (or `bash scripts/install_redis.sh`) and "
                "`pip install redis hiredis`")
_SLOTS = 16384


def find_redis_server() -> str | None:
    """Path of the ``redis-server`` executable, or ``None``."""
    found = shutil.which("redis-server")
    if found:
        return found
    for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(p, os.X_OK):
            return p
    return None


def unavailable_reason() -> str | None:
    """Why a private server cannot be started here (``None`` if it can)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return f"the redis Python client is not installed: {INSTALL_HINT}"
    if find_redis_server() is None:
        return f"redis-server is not installed: {INSTALL_HINT}"
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(with_bus: bool = False) -> int:
    """A free loopback port (with ``with_bus``, also free at ``port + 10000``, the
    cluster bus port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not with_bus or (port + 10000 < 65536 and _port_free(port + 10000)):
            return port
    raise RuntimeError("no free port pair found on 127.0.0.1")


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 (see the module docstring).

    Args:
        data_dir: its working directory (default: a new temporary directory, removed on stop).
        maxmemory: e.g. ``"4mb"``; with ``policy`` (default ``allkeys-lru``).
        cluster: run with ``cluster-enabled yes`` (used by :class:`RedisTestCluster`).
        tls: a :class:`~cacheblend_ext.testing.tls.TLSFiles`: serve TLS only (the plain
            port is closed), clients must trust ``tls.ca``; with ``tls_client_auth`` they
            must also present a certificate it signed.
        password: the default user's password (``None``: no password).
        users: ACL users, one rule line each (``"alice on >secret ~cacheblend:v2:alice:*
            +@all -@dangerous"``), written to the server's config file.
        extra: further ``--option value`` arguments.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, *, port: int | None = None,
                 maxmemory: str | None = None, policy: str = "allkeys-lru", cluster: bool = False,
                 tls=None, tls_client_auth: bool = False, password: str | None = None, users: tuple = (),
                 extra: tuple = ()):
        exe = find_redis_server()
        if exe is None:
            raise RuntimeError(f"redis-server is not installed: {INSTALL_HINT}")
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="cacheblend-redis-") if data_dir is None else data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(with_bus=cluster)
        self.tls, self.password = tls, password
        self.args = [exe]
        if users or password is not None:  # ACL rules go in a config file (one line per user)
            conf = self.data_dir / "redis.conf"
            secret = f">{password}" if password is not None else "nopass"
            lines = [f"user default on {secret} ~* &* +@all"] + [f"user {u}" for u in users]
            conf.write_text("\n".join(lines) + "\n")
            conf.chmod(0o600)
            self.args.append(str(conf))
        if tls is None:
            self.args += ["--port", str(self.port)]
        else:
            self.args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(tls.cert),
                          "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
                          "--tls-auth-clients", "yes" if tls_client_auth else "no"]
            if cluster:
                self.args += ["--tls-cluster", "yes"]
        self.args += ["--bind", "127.0.0.1", "--dir", str(self.data_dir),
                      "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
                      "--logfile", str(self.data_dir / "redis.log")]
        if maxmemory is not None:
            self.args += ["--maxmemory", str(maxmemory), "--maxmemory-policy", policy]
        if cluster:
            self.args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.data_dir / "nodes.conf"),
                          "--cluster-node-timeout", "2000"]
        self.args += [str(a) for a in extra]
        self.proc: subprocess.Popen | None = None

    def url_for(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        """``redis://`` (``rediss://`` with TLS) URL of the server, with ``user`` and
        ``password`` in it when given."""
        auth = f"{user or ''}:{password}@" if password is not None else (f"{user}@" if user else "")
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/{db}"

    @property
    def url(self) -> str:
        """The URL without credentials (TLS clients also need :attr:`client_options`)."""
        return self.url_for()

    @property
    def client_options(self) -> dict:
        """redis-py keyword arguments a client needs besides the URL (the test CA with TLS;
        a client certificate when the server asks for one)."""
        if self.tls is None:
            return {}
        return self.tls.client_options("--tls-auth-clients" in self.args
                                       and self.args[self.args.index("--tls-auth-clients") + 1] == "yes")

    def client(self, **kwargs):
        """An administrator's client (the default user, its password, TLS settings)."""
        import redis

        opts = dict(self.client_options, password=self.password)
        if self.tls is not None:
            opts["ssl"] = True
        opts.update(kwargs)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **opts)

    def start(self, timeout: float = 15.0) -> "RedisServer":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                if self.client(socket_connect_timeout=0.2).ping():
                    return self
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {timeout} s: {self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self) -> str:
        try:
            return (self.data_dir / "redis.log").read_text()[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server (a crash, for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()


def _as_dict(info) -> dict:
    """``CLUSTER INFO`` as a dict (redis-py parses it; raw replies are ``key:value`` lines)."""
    if isinstance(info, dict):
        return {str(k): str(v) for k, v in info.items()}
    text = info.decode() if isinstance(info, bytes) else str(info)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class RedisTestCluster:
    """Three cluster-enabled servers on 127.0.0.1 sharing all slots (no replicas); ``tls``,
    ``password`` and ``users`` as for :class:`RedisServer`, on every node (with TLS the
    cluster bus is TLS too)."""

    def __init__(self, data_dir: str | os.PathLike | None = None, nodes: int = 3, *, tls=None,
                 password: str | None = None, users: tuple = ()):
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="cacheblend-rcluster-") if data_dir is None else data_dir)
        self.tls = tls
        self.nodes = [RedisServer(self.data_dir / f"node{i}", cluster=True, tls=tls, password=password, users=users)
                      for i in range(nodes)]

    def url_for(self, user: str | None = None, password: str | None = None) -> str:
        """``redis+cluster://`` (``rediss+cluster://`` with TLS) URL of the first node (any
        node works as the entry point), with ``user`` and ``password`` when given."""
        return self.nodes[0].url_for(user, password).replace("://", "+cluster://", 1).rsplit("/", 1)[0]

    @property
    def url(self) -> str:
        return self.url_for()

    @property
    def client_options(self) -> dict:
        return self.nodes[0].client_options

    def start(self, timeout: float = 30.0) -> "RedisTestCluster":
        try:
            for n in self.nodes:
                n.start()
            clients = [n.client() for n in self.nodes]
            bounds = [round(i * _SLOTS / len(self.nodes)) for i in range(len(self.nodes) + 1)]
            for c, lo, hi in zip(clients, bounds, bounds[1:]):
                c.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
            for n in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", n.port)
            self._wait_ok(clients, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, clients, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            infos = [_as_dict(c.execute_command("CLUSTER INFO")) for c in clients]
            if all(i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == len(clients)
                   for i in infos):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test cluster did not become ready within {timeout} s: {infos}")
            time.sleep(0.05)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


__all__ = ["INSTALL_HINT", "RedisServer", "RedisTestCluster", "find_redis_server", "free_port", "unavailable_reason"]
