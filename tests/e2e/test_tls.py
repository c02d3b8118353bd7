"""TLS and mTLS on the gRPC port (and the metrics endpoint), certificate rotation without a restart, and the
refusal to listen beyond loopback without credentials."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.app import ConfigurationError, check_exposure, is_loopback
from leanserve.server.settings import Settings
from tests.e2e.pki import ADMIN_TOKEN, Pki, Secured, pki, secured, started, token_file  # noqa: F401

LEANSERVE = [sys.executable, "-m", "leanserve.server.cli"]
#: long enough for a TLS handshake on a busy machine; a channel that cannot connect never gets ready at all
NOT_READY_SECONDS = 3.0


def _never_ready(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=NOT_READY_SECONDS)


def test_plaintext_channel_to_the_tls_port_never_becomes_ready(secured: Secured) -> None:
    with grpc.insecure_channel(secured.target) as channel:
        _never_ready(channel)
    with Client(secured.target, token=ADMIN_TOKEN, timeout=10) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.models()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_checks_the_server_certificate(secured: Secured) -> None:
    with Client(secured.target, token=ADMIN_TOKEN, tls_ca=secured.pki.ca2) as c:  # a CA that did not sign it
        _never_ready(c.channel)
    with secured.client(ADMIN_TOKEN) as c:
        c.wait_ready(30)
        assert c.models() == {}


def _mtls_client(target: str, pki: Pki, cert: Path | None, key: Path | None) -> Client:
    return Client(target, tls_ca=pki.ca, tls_cert=cert, tls_key=key, timeout=120)


def test_mtls_needs_a_client_certificate_from_the_ca(pki: Pki, tmp_path: Path, model_files) -> None:
    with started(tmp_path / "models", tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                 tls_client_ca_file=pki.ca) as handle:
        target = f"127.0.0.1:{handle.port}"
        with _mtls_client(target, pki, None, None) as c:  # no client certificate: the handshake fails
            _never_ready(c.channel)
        with _mtls_client(target, pki, pki.stranger_cert, pki.stranger_key) as c:  # signed by another CA
            _never_ready(c.channel)
        with _mtls_client(target, pki, pki.client_cert, pki.client_key) as c:
            assert c.upload(model_files["seed_h5"], "seed").version == 1
            assert c.predict("seed", np.zeros((1, 1000), np.float32)).output.shape == (1, 10)
        entry = json.loads((tmp_path / "models" / "audit.jsonl").read_text().splitlines()[-1])
        assert (entry["who"], entry["what"], entry["result"]) == ("ci-client", "upload", "ok")  # the cert's CN


def test_certificate_files_are_read_again_when_they_change(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)

    def replace(src: Path, dst: Path) -> None:  # how cert-manager and certbot swap files: write, then rename
        shutil.copy(src, dst.with_suffix(".tmp"))
        os.replace(dst.with_suffix(".tmp"), dst)

    with started(tmp_path / "models", tls_cert_file=cert, tls_key_file=key) as handle:
        target = f"127.0.0.1:{handle.port}"
        with Client(target, tls_ca=pki.ca) as c:
            assert c.models() == {}
        replace(pki.server2_cert, cert)  # half-way through a rotation the key does not match: the old pair stays
        with Client(target, tls_ca=pki.ca) as c:
            assert c.models() == {}
        replace(pki.server2_key, key)
        with Client(target, tls_ca=pki.ca2) as c:  # new connections get the new certificate
            assert c.models() == {}
        with Client(target, tls_ca=pki.ca) as c:
            _never_ready(c.channel)
        handle.reload_credentials()  # SIGHUP: read again even though nothing changed
        with Client(target, tls_ca=pki.ca2) as c:
            assert c.models() == {}


def test_metrics_endpoint_serves_https_with_the_same_certificate(secured: Secured) -> None:
    url = f"https://127.0.0.1:{secured.handle.metrics_port}/metrics"
    context = ssl.create_default_context(cafile=str(secured.pki.ca))
    with urllib.request.urlopen(url, context=context, timeout=30) as resp:
        assert resp.status == 200 and b"nv_inference" in resp.read()
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{secured.handle.metrics_port}/metrics", timeout=30).read()


def test_silent_connections_do_not_stop_https_scrapes(secured: Secured) -> None:
    """The TLS handshake runs in each connection's thread under a timeout: a few connections that send nothing do
    not block a scrape (one blocked prometheus-client's server for good), and many hold at most MAX_CONNECTIONS
    threads, the rest being closed at once."""
    import socket
    import threading

    from leanserve.server.serving.metrics import MAX_CONNECTIONS

    port = secured.handle.metrics_port
    context = ssl.create_default_context(cafile=str(secured.pki.ca))
    threads = threading.active_count()
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4)]
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=context, timeout=5) as resp:
            assert resp.status == 200 and b"nv_inference" in resp.read()
        silent += [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(MAX_CONNECTIONS + 8)]
        time.sleep(0.5)
        assert threading.active_count() <= threads + MAX_CONNECTIONS + 1
    finally:
        for conn in silent:
            conn.close()


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False), ("example.com", False),
])
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_exposure_needs_tls_tokens_or_insecure(tmp_path: Path) -> None:
    files = {"tls_cert_file": tmp_path / "c", "tls_key_file": tmp_path / "k"}
    with pytest.raises(ConfigurationError):
        check_exposure(Settings(host="0.0.0.0"))
    for ok in (dict(host="0.0.0.0", insecure=True), dict(host="0.0.0.0", auth_tokens_file=tmp_path / "t"),
               dict(host="0.0.0.0", **files), dict(host="127.0.0.1")):
        check_exposure(Settings(**ok))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="go together"):
        Settings(tls_cert_file=tmp_path / "c")


def test_unusable_credential_files_stop_the_start_before_anything_is_loaded(pki: Pki, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    bad_tokens = tmp_path / "tokens"
    bad_tokens.write_text("admin not-a-digest ops\n")
    cases = [
        (dict(auth_tokens_file=bad_tokens), "line 1"),
        (dict(auth_tokens_file=tmp_path / "missing"), "missing"),
        (dict(tls_cert_file=pki.server_cert, tls_key_file=pki.server2_key), "cannot use TLS files"),
        (dict(tls_cert_file=tmp_path / "none.pem", tls_key_file=pki.server_key), "not found"),
    ]
    for overrides, expect in cases:
        with pytest.raises(ConfigurationError, match=expect):
            with started(repo, **overrides):
                pass
    assert not repo.exists()


def _serve_env() -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", LEANSERVE_METRICS="false", LEANSERVE_SHUTDOWN_GRACE_SECONDS="0")


def test_non_loopback_host_without_credentials_refuses_to_start(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    proc = subprocess.run([*LEANSERVE, "serve", "--host", "0.0.0.0", "--port", "0", "--repository", str(repo)],
                          capture_output=True, text=True, timeout=120, env=_serve_env())
    assert proc.returncode == 2, proc.stderr
    for flag in ("--tls-cert", "--auth-tokens", "--insecure"):
        assert flag in proc.stderr
    assert not repo.exists()  # it stopped before loading anything, let alone binding
    assert "listening" not in proc.stdout


def test_insecure_flag_starts_on_a_non_loopback_host(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with open(log, "w") as err:  # a file, not a pipe: nobody has to drain it while the server runs
        proc = subprocess.Popen([*LEANSERVE, "serve", "--host", "0.0.0.0", "--port", "0", "--insecure",
                                 "--repository", str(tmp_path / "repo")],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=_serve_env())
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("listening on 0.0.0.0:"), line + log.read_text()
        proc.send_signal(signal.SIGTERM)  # nothing is sent to it: it only has to start
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
