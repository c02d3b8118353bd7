"""Prometheus metrics with Triton's names, read at scrape time from each served version's ``ModelStats``.

One ``CollectorRegistry`` per server (never the process-global one), so several servers in one process (tests)
do not clash. prometheus-client appends ``_total`` to counter names in the exposition (Prometheus convention):
Triton's ``nv_inference_count`` is scraped as ``nv_inference_count_total``.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from leanserve.server.serving.model import ServedModel

_LABELS = ["model", "version"]
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_COUNTERS = (
    ("nv_inference_request_success", "Requests answered successfully.", lambda s: s.success_count),
    ("nv_inference_request_failure", "Requests that failed after their model was found.", lambda s: s.fail_count),
    ("nv_inference_count", "Rows inferred (a request of 16 rows counts 16).", lambda s: s.inference_count),
    ("nv_inference_exec_count", "Kernel calls (batches) executed.", lambda s: s.execution_count),
    ("nv_inference_request_duration_us", "Cumulative time of answered and failed requests (µs).",
     lambda s: (s.success_ns + s.fail_ns) // 1000),
    ("nv_inference_queue_duration_us", "Cumulative time requests waited in the batch queue (µs).",
     lambda s: s.queue_ns // 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative kernel time, counted per request (µs).",
     lambda s: s.compute_ns // 1000),
)


class ModelStatsCollector(Collector):
    """Emits the counters and the batch size histogram of every served version."""

    def __init__(self, models: Callable[[], Iterable[ServedModel]]) -> None:
        self._models = models

    def collect(self) -> Iterable[Metric]:
        snaps = [(m.name, str(m.version), m.stats.snapshot()) for m in self._models()]
        for name, doc, read in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=_LABELS)
            for model, version, snap in snaps:
                family.add_metric([model, version], read(snap))
            yield family
        hist = HistogramMetricFamily(
            "leanserve_batch_size", "Rows per kernel call (dynamic batching).", labels=_LABELS
        )
        for model, version, snap in snaps:
            buckets, total_rows = [], 0
            for bound in _BATCH_BUCKETS:
                buckets.append((str(float(bound)), sum(n for rows, (n, _) in snap.batches.items() if rows <= bound)))
            buckets.append(("+Inf", snap.execution_count))
            total_rows = sum(rows * n for rows, (n, _) in snap.batches.items())
            hist.add_metric([model, version], buckets, total_rows)
        yield hist


#: scrapes served at once; past it a connection is closed at once (scrapers retry), so idle or slow clients hold at
#: most this many threads
MAX_CONNECTIONS = 16
#: longest wait for a client's TLS handshake or its next bytes; then its connection is closed
CONNECTION_TIMEOUT_SECONDS = 10.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's signature
        pass


class _MetricsHTTPServer(ThreadingMixIn, WSGIServer):
    """A threaded WSGI server whose connections cannot hold it: the TLS handshake runs in the connection's own
    thread (prometheus-client's server runs it inside ``accept``, so one silent TCP connection stops every scrape),
    every read and the handshake time out, and at most ``MAX_CONNECTIONS`` are served at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext | None) -> None:
        self._tls = tls
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _QuietHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        conn.settimeout(CONNECTION_TIMEOUT_SECONDS)
        return conn, addr

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._slots.acquire(blocking=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self._tls is not None:
                request = self._tls.wrap_socket(request, server_side=True)  # the handshake, under the timeout
            self.finish_request(request, client_address)
        except (OSError, ssl.SSLError):
            pass  # a client that went away, timed out or failed the handshake: nothing to answer
        finally:
            self.shutdown_request(request)
            self._slots.release()


def _tls_context(certfile: Path, keyfile: Path, client_cafile: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certfile), str(keyfile))
    if client_cafile is not None:
        context.load_verify_locations(cafile=str(client_cafile))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class MetricsServer:
    """The /metrics HTTP endpoint of one leanserve server."""

    def __init__(self, models: Callable[[], Iterable[ServedModel]], host: str, port: int, *,
                 certfile: Path | None = None, keyfile: Path | None = None,
                 client_cafile: Path | None = None) -> None:
        """Listen on ``host:port``; HTTPS with ``certfile``/``keyfile`` (read once, at start), and requiring a client
        certificate signed by ``client_cafile`` when given."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ModelStatsCollector(models))
        tls = _tls_context(certfile, keyfile, client_cafile) if certfile is not None and keyfile is not None else None
        self._httpd = _MetricsHTTPServer((host, port), tls)
        self._httpd.set_app(make_wsgi_app(self.registry))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.port: int = self._httpd.server_port

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
