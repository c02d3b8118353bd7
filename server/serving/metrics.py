"""Prometheus metrics with Triton's names, read at scrape time from each served version's ``ModelStats``.

One ``CollectorRegistry`` per server (never the process-global one), so several servers in one process (tests)
do not clash. prometheus-client appends ``_total`` to counter names in the exposition (Prometheus convention):
Triton's ``nv_inference_count`` is scraped as ``nv_inference_count_total``.
"""

from __future__ import annotations

import contextlib
import io
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
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


#: connections served at once; past it the oldest one still sending its request is closed to make room (a scrape's
#: request takes milliseconds, a trickler's lasts), else the new one is closed at once (scrapers retry); so idle or
#: slow clients hold at most this many threads and cannot keep a scraper out
MAX_CONNECTIONS = 16
#: the TLS handshake, request line and headers must all arrive within this time of the connection's accept (a
#: whole-request deadline: a client trickling one byte at a time gains nothing); then its connection is closed
REQUEST_DEADLINE_SECONDS = 5.0
#: once the request is in, longest wait for the client's next bytes or for room to send it the answer
CONNECTION_TIMEOUT_SECONDS = 10.0
#: most bytes of request line and headers a connection may send (a scrape's take a few hundred): http.server alone
#: would take 100 header lines of 64 KiB each
MAX_REQUEST_BYTES = 64 * 1024


class _Connection:
    """One admitted connection: its request deadline, whether it is still sending its request, and how to end it
    from another thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.deadline = time.monotonic() + REQUEST_DEADLINE_SECONDS
        self.reading = True  # still sending its request: the one closed first when room is needed
        self.evicted = False
        # A second descriptor of the same socket: shutting it down ends a blocking read in the connection's thread
        # whatever wraps the accepted socket by then (wrap_socket detaches it).
        self._control = sock.dup()

    def arm(self, sock: socket.socket) -> None:
        """Let the next operation on ``sock`` wait at most until the deadline; TimeoutError once it passed."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        sock.settimeout(remaining)

    def end(self) -> None:
        with contextlib.suppress(OSError):
            self._control.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._control.close()


class _RequestReader(io.RawIOBase):
    """The connection's input: while the request is being sent, reads wait at most until the request deadline and
    stop at ``MAX_REQUEST_BYTES``."""

    def __init__(self, sock: socket.socket, connection: _Connection) -> None:
        super().__init__()
        self._sock, self._connection = sock, connection
        self._received = 0  # bytes read while the request is being sent

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._connection.reading:
            return self._sock.recv_into(buffer)
        self._connection.arm(self._sock)
        room = MAX_REQUEST_BYTES - self._received
        if room <= 0:
            raise ConnectionAbortedError(f"more than {MAX_REQUEST_BYTES} bytes of request line and headers")
        got = self._sock.recv_into(memoryview(buffer)[:room])
        self._received += got
        return got


class _Handler(WSGIRequestHandler):
    def __init__(self, request: Any, client_address: Any, server: _MetricsHTTPServer, connection: _Connection) -> None:
        self._connection = connection
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader: replaced by one that keeps the request deadline
        self.rfile = io.BufferedReader(_RequestReader(self.connection, self._connection))

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        self.connection.settimeout(CONNECTION_TIMEOUT_SECONDS)
        return self.server.answering(self._connection)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's signature
        pass


class _MetricsHTTPServer(WSGIServer):
    """A WSGI server with a thread per connection whose connections cannot hold it: the TLS handshake runs in the
    connection's own thread (prometheus-client's server runs it inside ``accept``, so one silent TCP connection
    stops every scrape), the handshake and request must arrive within ``REQUEST_DEADLINE_SECONDS``, and at most
    ``MAX_CONNECTIONS`` are served at once, a new one taking the place of the oldest still sending its request."""

    # connections wait in the kernel while the accepting thread starts threads (5, the default, makes a burst of
    # connects wait a second for a SYN retransmit)
    request_queue_size = 4 * MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], tls: Callable[[], ssl.SSLContext] | None) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)  # type: ignore[arg-type]  # built by _serve, with its connection

    def process_request(self, request: Any, client_address: Any) -> None:
        connection = self._admit(request)
        if connection is None:
            self.shutdown_request(request)
            return
        try:
            threading.Thread(target=self._serve, args=(request, client_address, connection),
                             name="metrics-connection", daemon=True).start()
        except BaseException:
            self._leave(connection)
            raise  # the caller closes the request

    def _admit(self, request: socket.socket) -> _Connection | None:
        """The new connection's entry, making room by ending the oldest one still sending its request; None when
        every slot is answering a request (or no descriptor is left)."""
        try:
            connection = _Connection(request)
        except OSError:
            return None
        with self._lock:
            if len(self._connections) >= MAX_CONNECTIONS:
                oldest = min((c for c in self._connections if c.reading), key=lambda c: c.deadline, default=None)
                if oldest is None:
                    connection.close()
                    return None
                oldest.evicted = True
                self._connections.discard(oldest)
                oldest.end()  # its thread's read fails at once; the thread closes it
            self._connections.add(connection)
        return connection

    def answering(self, connection: _Connection) -> bool:
        """Mark ``connection``'s request as received (it is no longer closed for room); False if it already was."""
        with self._lock:
            connection.reading = False
            return not connection.evicted

    def _leave(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
        connection.close()

    def _serve(self, request: Any, client_address: Any, connection: _Connection) -> None:
        try:
            if self._tls is not None:
                connection.arm(request)
                # the context is asked for each connection, so a rotated certificate serves the next handshake
                request = self._tls().wrap_socket(request, server_side=True)  # the handshake, within the deadline
            _Handler(request, client_address, self, connection)
        except OSError:
            pass  # a client that went away, timed out, failed the handshake or was closed for room: nothing to answer
        finally:
            self.shutdown_request(request)
            self._leave(connection)


class MetricsServer:
    """The /metrics HTTP endpoint of one leanserve server."""

    def __init__(self, models: Callable[[], Iterable[ServedModel]], host: str, port: int, *,
                 tls: Callable[[], ssl.SSLContext] | None = None) -> None:
        """Listen on ``host:port``; HTTPS when ``tls`` is given. It is called for each accepted connection and
        returns the server-side context to use (``ServerCertificates.ssl_context``: re-read when the files change
        or on SIGHUP, the same certificate as the gRPC port), so a rotated certificate serves new connections."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ModelStatsCollector(models))
        self._httpd = _MetricsHTTPServer((host, port), tls)
        self._httpd.set_app(make_wsgi_app(self.registry))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.port: int = self._httpd.server_port

    def stop(self) -> None:
        """Stop accepting and close the listening socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
