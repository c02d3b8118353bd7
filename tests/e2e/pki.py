"""Throwaway certificates and tokens for the TLS/mTLS/token tests (made with the ``openssl`` command).

``pki`` (session fixture): two CAs, a server certificate of each (SAN IP:127.0.0.1 and DNS:localhost), a client
certificate of the first CA (CN "ci-client") and one of the second ("stranger"). ``tokens``: an admin and an
infer token and the file listing their sha256 digests; ``secured``: a server with TLS and those tokens. Import the
fixtures into a test module to use them.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from leanserve.client import Client
from leanserve.server.app import ServerHandle, create_server
from tests.conftest import make_settings

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
INFER_TOKEN = "infer-token-for-tests-9876543210"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def make_leaf(d: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    """A certificate signed by ``ca``: for a server (SAN 127.0.0.1/localhost) or a client (CN = ``name``)."""
    ext = d / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={usage}\n" + ("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else ""))
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", str(ext), cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    ca2: Path
    server2_cert: Path
    server2_key: Path
    stranger_cert: Path
    stranger_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, ca2 = make_ca(d, "test-ca"), make_ca(d, "other-ca")
    server, client = make_leaf(d, "server", ca, server=True), make_leaf(d, "ci-client", ca, server=False)
    server2, stranger = make_leaf(d, "server2", ca2, server=True), make_leaf(d, "stranger", ca2, server=False)
    return Pki(ca[0], *server, *client, ca2[0], *server2, *stranger)


def token_line(role: str, token: str, label: str = "") -> str:
    return f"{role} {hashlib.sha256(token.encode()).hexdigest()} {label}".rstrip() + "\n"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# role sha256 label\n" + token_line("admin", ADMIN_TOKEN, "ci-admin")
                    + token_line("infer", INFER_TOKEN, "dashboard"))
    return path


@dataclass
class Secured:
    """A started server with TLS and tokens, and how to reach it."""

    handle: ServerHandle
    pki: Pki
    tokens: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.handle.port}"

    def client(self, token: str | None = None, **kwargs: object) -> Client:
        return Client(self.target, token=token, tls_ca=self.pki.ca, timeout=120, **kwargs)  # type: ignore[arg-type]

    def channel(self) -> grpc.Channel:
        """A TLS channel without a token."""
        return grpc.secure_channel(self.target, grpc.ssl_channel_credentials(self.pki.ca.read_bytes()))


@contextlib.contextmanager
def started(repository: Path, **overrides: object) -> Iterator[ServerHandle]:
    """A server from ``make_settings(repository, **overrides)``, stopped at the end."""
    handle = create_server(make_settings(repository, **overrides))
    try:
        yield handle
    finally:
        handle.stop(0.5)


@pytest.fixture
def secured(pki: Pki, token_file: Path, tmp_path: Path) -> Iterator[Secured]:
    """``--tls-cert/--tls-key/--auth-tokens`` (admin token ADMIN_TOKEN "ci-admin", infer token INFER_TOKEN
    "dashboard")."""
    with started(tmp_path / "models", tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                 auth_tokens_file=token_file) as handle:
        yield Secured(handle, pki, token_file)
