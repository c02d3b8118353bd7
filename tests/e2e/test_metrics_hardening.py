"""The Prometheus endpoint under certificate rotation and slow clients: it serves the certificate the gRPC port
serves (files replaced, or SIGHUP; the mTLS client CA too), a request must arrive within a deadline of the
connection's accept, and connections still sending their request cannot keep a scrape out."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from leanserve.client import Client
from leanserve.server.serving import metrics
from tests.e2e.pki import Pki, pki, started  # noqa: F401

T = TypeVar("T")
#: what a slow client sends first: a request line and the start of a header it never finishes
TRICKLE_START = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: "
#: margin on top of the request deadline for a busy machine
MARGIN_SECONDS = 3.0


def _scrape_https(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=context, timeout=5) as resp:
        assert b"nv_inference" in resp.read()
        return resp.status


def _within(seconds: float, attempt: Callable[[], T]) -> T:
    """``attempt()`` until it returns, for at most ``seconds``; then its last error."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return attempt()
        except (OSError, http.client.HTTPException):  # ssl errors, URLError and resets are OSErrors
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.1)


def _replace(src: Path, dst: Path) -> None:
    """How cert-manager and certbot swap files: write, then rename."""
    shutil.copy(src, dst.with_suffix(".tmp"))
    os.replace(dst.with_suffix(".tmp"), dst)


def _rewrite_unseen(path: Path, data: bytes) -> None:
    """Rewrite ``path`` in place keeping its inode, size and mtime: only a forced reload (SIGHUP) can notice."""
    before = os.stat(path)
    assert len(data) == before.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def _padded(pem: Path, size: int = 4096) -> bytes:
    data = pem.read_bytes()
    assert len(data) <= size
    return data + b"\n" * (size - len(data))  # blank lines after a PEM block are ignored


def test_metrics_https_serves_the_rotated_certificate(pki: Pki, tmp_path: Path) -> None:  # noqa: F811
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    with started(tmp_path / "models", tls_cert_file=cert, tls_key_file=key) as handle:
        port = handle.metrics_port
        assert port is not None and _scrape_https(port, pki.ca) == 200
        _replace(pki.server2_cert, cert)  # half-way through a rotation the key does not match: the old pair stays
        assert _scrape_https(port, pki.ca) == 200
        _replace(pki.server2_key, key)
        assert _within(5.0, lambda: _scrape_https(port, pki.ca2)) == 200  # new connections get the new certificate
        with pytest.raises(urllib.error.URLError) as err:
            _scrape_https(port, pki.ca)
        assert isinstance(err.value.reason, ssl.SSLCertVerificationError)
        with Client(f"127.0.0.1:{handle.port}", tls_ca=pki.ca2, timeout=30) as c:  # and the gRPC port too
            assert c.models() == {}


def test_sighup_rereads_the_client_ca_for_metrics_too(pki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """mTLS: a client CA replaced without a visible change is picked up by a forced reload (SIGHUP); the gRPC port
    taking the new files first must not hide them from the metrics endpoint (one owner of the current pair)."""
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(_padded(pki.ca))
    with started(tmp_path / "models", tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                 tls_client_ca_file=client_ca) as handle:
        port = handle.metrics_port
        assert port is not None
        assert _scrape_https(port, pki.ca, pki.client_cert, pki.client_key) == 200
        _rewrite_unseen(client_ca, _padded(pki.ca2))
        assert _scrape_https(port, pki.ca, pki.client_cert, pki.client_key) == 200  # unseen: not re-read yet
        handle.reload_credentials()
        with Client(f"127.0.0.1:{handle.port}", tls_ca=pki.ca, tls_cert=pki.stranger_cert,
                    tls_key=pki.stranger_key, timeout=30) as c:  # gRPC's handshake reads the files first
            assert c.models() == {}
        assert _within(5.0, lambda: _scrape_https(port, pki.ca, pki.stranger_cert, pki.stranger_key)) == 200
        with pytest.raises((OSError, http.client.HTTPException)):  # its CA is no longer the client CA
            _scrape_https(port, pki.ca, pki.client_cert, pki.client_key)


def _keep_alive_scrape(port: int) -> int:
    """One GET as Prometheus sends it (HTTP/1.1, keep-alive asked for)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/metrics", headers={"Connection": "keep-alive", "Accept": "text/plain"})
        resp = conn.getresponse()
        assert b"nv_inference" in resp.read()
        return resp.status
    finally:
        conn.close()


def _trickle(socks: list[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.sendall(b"a")
        except OSError:
            pass  # the server closed it: what it should do to a trickler sooner or later


def test_trickling_connections_do_not_keep_a_scrape_out(tmp_path: Path) -> None:
    with started(tmp_path / "models") as handle:
        port = handle.metrics_port
        assert port is not None and _keep_alive_scrape(port) == 200
        # connected (and so accepted) before the scrape's connection: they hold every slot first
        tricklers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(metrics.MAX_CONNECTIONS)]
        try:
            for sock in tricklers:
                sock.sendall(TRICKLE_START)

            def scrape() -> int:
                _trickle(tricklers)  # a byte before each try: every read timeout keeps being reset
                return _keep_alive_scrape(port)

            start = time.monotonic()
            assert _within(metrics.REQUEST_DEADLINE_SECONDS + MARGIN_SECONDS, scrape) == 200
            assert time.monotonic() - start < metrics.REQUEST_DEADLINE_SECONDS + MARGIN_SECONDS
        finally:
            for sock in tricklers:
                sock.close()


def test_a_request_trickled_in_is_closed_at_the_deadline(tmp_path: Path) -> None:
    """The deadline counts from the accept: one header byte every half second, each well within the read timeout,
    does not keep the connection."""
    with started(tmp_path / "models") as handle:
        port = handle.metrics_port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(TRICKLE_START)
            start, closed = time.monotonic(), False
            sock.settimeout(0.5)  # the pace of the trickle
            while not closed and time.monotonic() - start < metrics.REQUEST_DEADLINE_SECONDS + MARGIN_SECONDS:
                try:
                    sock.sendall(b"a")
                    closed = sock.recv(1) == b""  # nothing is answered to an unfinished request: only the close
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
            elapsed = time.monotonic() - start
        assert closed, f"still open after {elapsed:.1f} s of trickling"
        assert elapsed >= metrics.REQUEST_DEADLINE_SECONDS - 0.5  # the deadline closed it, not something else


def test_a_request_past_the_size_cap_is_closed_and_scrapes_go_on(tmp_path: Path) -> None:
    """Headers are capped as a whole: http.server alone takes 100 lines of 64 KiB each (6.5 MB per connection), and
    these 90 lines of 4 KB, never ended by a blank line, would have been held until the deadline."""
    with started(tmp_path / "models") as handle:
        port = handle.metrics_port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(TRICKLE_START)
            closed = False
            try:
                for _ in range(90):
                    sock.sendall(b"a" * 4000 + b"\r\nX-b: ")
                sock.settimeout(metrics.REQUEST_DEADLINE_SECONDS / 2)  # the cap, not the deadline, must close it
                closed = sock.recv(1) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed = True
            except TimeoutError:
                pass
        assert closed, "a request of 360 KB of headers was still open"
        assert _keep_alive_scrape(port) == 200
