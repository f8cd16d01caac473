"""Throw-away TLS certificates for the private Redis servers of the tests and benchmarks.

:func:`make_test_certificates` makes a self-signed certificate authority and, signed by
it, a server certificate for 127.0.0.1 / localhost and a client certificate, with the
``openssl`` command (Debian package ``openssl``; ``scripts/install_redis.sh`` installs it
with redis-server). Keys are EC P-256, valid for two days, written without a passphrase
into a directory of the caller's (a test's temporary directory): for tests only.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL_HINT = "install it with `apt-get install -y openssl` (or `bash scripts/install_redis.sh`)"

_LEAF_EXTENSIONS = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage={usage}
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
{san}
"""


@dataclass(frozen=True)
class TLSFiles:
    """Paths of a test CA and the server and client certificates it signed."""

    ca: Path  # the CA certificate clients and servers trust
    cert: Path  # the server's certificate (127.0.0.1, localhost)
    key: Path  # the server's private key
    client_cert: Path
    client_key: Path

    def client_options(self, client_certificate: bool = False) -> dict:
        """redis-py keyword arguments that trust the test CA (and present the client
        certificate when ``client_certificate``)."""
        opts = {"ssl_ca_certs": str(self.ca)}
        if client_certificate:
            opts.update(ssl_certfile=str(self.client_cert), ssl_keyfile=str(self.client_key))
        return opts


def find_openssl() -> str | None:
    """Path of the ``openssl`` command, or ``None``."""
    return shutil.which("openssl") or next((p for p in ("/usr/bin/openssl",) if Path(p).exists()), None)


def _run(openssl: str, *args) -> None:
    done = subprocess.run([openssl, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stdout.decode(errors='replace')[-1000:]}")


def make_test_certificates(directory, days: int = 2) -> TLSFiles:
    """Make a CA, a server certificate for 127.0.0.1 and localhost and a client certificate
    in ``directory`` (created if needed)."""
    openssl = find_openssl()
    if openssl is None:
        raise RuntimeError(f"the openssl command is not installed: {OPENSSL_HINT}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run(openssl, "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.crt", "-days", days,
         "-subj", "/CN=cacheblend test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-addext", "subjectKeyIdentifier=hash")
    # a cluster node also presents its server certificate as a client of the other nodes' bus
    leaves = {"server": ("serverAuth,clientAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
              "client": ("clientAuth", "")}
    for name, (usage, san) in leaves.items():
        ext = d / f"{name}.ext"
        ext.write_text(_LEAF_EXTENSIONS.format(usage=usage, san=san))
        _run(openssl, "req", *ec, "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
             "-subj", f"/CN=cacheblend test {name}")
        _run(openssl, "x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
             "-CAcreateserial", "-out", d / f"{name}.crt", "-days", days, "-extfile", ext)
    return TLSFiles(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


__all__ = ["OPENSSL_HINT", "TLSFiles", "find_openssl", "make_test_certificates"]
