"""TLS (and mTLS) credentials for the gRPC port, read from files and re-read when they change.

grpc asks ``ServerCertificates._fetch`` before every new handshake whether the certificate changed; it answers
from the files' stat (cheap), so replacing the files (e.g. by cert-manager or certbot) rotates the certificate for
new connections without a restart. ``reload()`` (SIGHUP) forces a re-read. A new pair that does not load (half
written, key not matching the certificate) is logged and the current one stays in use.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int], ...]


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
        self._initial = self._read()  # a pair that does not load is fatal at start
        self._current: _Stamp | None = stamp
        self._refused: _Stamp | None = None

    def _files(self) -> list[Path]:
        return [p for p in (self.cert_file, self.key_file, self.client_ca_file) if p is not None]

    def _stamp(self) -> _Stamp | None:
        try:
            return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in map(os.stat, self._files()))
        except OSError:
            return None

    def _read(self) -> grpc.ServerCertificateConfiguration:
        """Load and check the files; ValueError with the reason when they do not make a usable configuration."""
        try:
            check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            check.load_cert_chain(self.cert_file, self.key_file)  # the key must match the certificate
            if self.client_ca_file is not None:
                check.load_verify_locations(cafile=self.client_ca_file)
            chain, key = self.cert_file.read_bytes(), self.key_file.read_bytes()
            ca = self.client_ca_file.read_bytes() if self.client_ca_file is not None else None
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot use TLS files {', '.join(map(str, self._files()))}: {exc}") from None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port`` that pick up new files for each new connection."""
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.client_ca_file is not None
        )

    def reload(self) -> None:
        """Re-read the files before the next handshake even if their stat did not change (SIGHUP)."""
        self._force = True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc on its own threads before each handshake; must not raise. None = keep the current one.
        stamp = self._stamp()
        if stamp is None or (not self._force and stamp in (self._current, self._refused)):
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            self._force = False
            try:
                config = self._read()
            except ValueError as exc:
                self._refused = stamp
                log.error("keeping the current TLS certificate: %s", exc)
                return None
            if self._stamp() != stamp:
                return None  # the files changed while being read: read them again at the next handshake
            self._current = stamp
            log.info("TLS certificate re-read from %s", self.cert_file)
            return config
        except Exception:  # a bug must not break handshakes
            log.exception("re-reading the TLS certificate failed")
            return None
        finally:
            self._lock.release()
