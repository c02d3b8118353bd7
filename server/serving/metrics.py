"""Prometheus metrics with Triton's names, read at scrape time from each served version's ``ModelStats``.

One ``CollectorRegistry`` per server (never the process-global one), so several servers in one process (tests)
do not clash. prometheus-client appends ``_total`` to counter names in the exposition (Prometheus convention):
Triton's ``nv_inference_count`` is scraped as ``nv_inference_count_total``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
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


class MetricsServer:
    """The /metrics HTTP endpoint of one leanserve server."""

    def __init__(self, models: Callable[[], Iterable[ServedModel]], host: str, port: int, *,
                 certfile: Path | None = None, keyfile: Path | None = None,
                 client_cafile: Path | None = None) -> None:
        """Listen on ``host:port``; HTTPS with ``certfile``/``keyfile`` (read once, at start), and requiring a client
        certificate signed by ``client_cafile`` when given."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ModelStatsCollector(models))
        self._httpd: WSGIServer
        tls = {}
        if certfile is not None and keyfile is not None:
            tls = {"certfile": str(certfile), "keyfile": str(keyfile)}
            if client_cafile is not None:
                tls.update(client_cafile=str(client_cafile), client_auth_required=True)
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry, **tls)
        self.port: int = self._httpd.server_port

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
