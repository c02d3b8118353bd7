"""TLS (and mTLS) credentials for the gRPC port and the metrics endpoint, read from files and re-read when they
change.

grpc asks ``ServerCertificates._fetch`` before every new handshake whether the certificate changed, and the metrics
endpoint asks ``ssl_context()`` for each connection it accepts; both answer from the files' stat (cheap), so
replacing the files (e.g. by cert-manager or certbot) rotates the certificate for new connections without a restart.
``reload()`` (SIGHUP) forces a re-read. A new pair that does not load (half written, key not matching the
certificate) is logged and the current one stays in use. One object decides which files are current: both ports
always serve the same certificate.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path
from typing import NamedTuple

import grpc

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int], ...]


class _Loaded(NamedTuple):
    """One pair (and client CA) that loaded, in the forms each port needs."""

    generation: int  # counts the re-reads that loaded: a consumer compares it with the one it last applied
    config: grpc.ServerCertificateConfiguration
    context: ssl.SSLContext


class ServerCertificates:
    """The server's certificate chain and key, and the CA its clients' certificates must chain to (mTLS)."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file else None
        self._lock = threading.Lock()
        self._force = False
        stamp = self._stamp()
        if stamp is None:
            missing = [str(p) for p in self._files() if not p.is_file()]
            raise ValueError(f"TLS file(s) not found: {', '.join(missing)}")
        self._loaded = _Loaded(0, *self._read())  # a pair that does not load is fatal at start
        self._grpc_generation = 0  # the generation grpc serves (given at start or returned by _fetch)
        self._current: _Stamp | None = stamp
        self._refused: _Stamp | None = None

    def _files(self) -> list[Path]:
        return [p for p in (self.cert_file, self.key_file, self.client_ca_file) if p is not None]

    def _stamp(self) -> _Stamp | None:
        try:
            return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in map(os.stat, self._files()))
        except OSError:
            return None

    def _read(self) -> tuple[grpc.ServerCertificateConfiguration, ssl.SSLContext]:
        """Load and check the files; ValueError with the reason when they do not make a usable configuration."""
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.cert_file, self.key_file)  # the key must match the certificate
            if self.client_ca_file is not None:
                context.load_verify_locations(cafile=self.client_ca_file)
                context.verify_mode = ssl.CERT_REQUIRED
            chain, key = self.cert_file.read_bytes(), self.key_file.read_bytes()
            ca = self.client_ca_file.read_bytes() if self.client_ca_file is not None else None
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot use TLS files {', '.join(map(str, self._files()))}: {exc}") from None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca), context

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port`` that pick up new files for each new connection."""
        loaded = self._loaded
        self._grpc_generation = loaded.generation
        return grpc.dynamic_ssl_server_credentials(
            loaded.config, self._fetch, require_client_authentication=self.client_ca_file is not None
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side ``SSLContext`` with the current pair (requiring a client certificate from the client CA
        when one is set), re-read first when the files changed. Never raises: the last pair that loaded stays."""
        return self._refresh().context

    def reload(self) -> None:
        """Re-read the files before the next handshake even if their stat did not change (SIGHUP)."""
        self._force = True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc on its own threads before each handshake; must not raise. None = keep the current one.
        loaded = self._refresh()
        if loaded.generation == self._grpc_generation:
            return None
        self._grpc_generation = loaded.generation  # handshakes racing here may both return one: the next corrects
        return loaded.config

    def _refresh(self) -> _Loaded:
        """The current pair, after re-reading the files if their stat changed since (or ``reload()`` was called)."""
        stamp = self._stamp()
        if stamp is None or (not self._force and stamp in (self._current, self._refused)):
            return self._loaded
        if not self._lock.acquire(blocking=False):
            return self._loaded  # another handshake is reading them: this one keeps the current pair
        try:
            self._force = False
            try:
                config, context = self._read()
            except ValueError as exc:
                self._refused = stamp
                log.error("keeping the current TLS certificate: %s", exc)
                return self._loaded
            if self._stamp() != stamp:
                return self._loaded  # the files changed while being read: read them again at the next handshake
            self._current = stamp
            self._loaded = _Loaded(self._loaded.generation + 1, config, context)
            log.info("TLS certificate re-read from %s", self.cert_file)
        except Exception:  # a bug must not break handshakes
            log.exception("re-reading the TLS certificate failed")
        finally:
            self._lock.release()
        return self._loaded
