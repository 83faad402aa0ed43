"""The Prometheus /metrics endpoint: each service's last scan, its certificates and capture."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from depdrill.daemon.history import Outcome
from depdrill.daemon.scan import ScanDone
from depdrill.execute.model import Verdict


@dataclass
class ServiceView:
    """What the daemon knows of one service at scrape time."""

    name: str
    last: ScanDone | None = None
    target_up: bool = False
    kernel_drops: int = 0
    windows: int = 0
    scans: dict[Outcome, int] = field(default_factory=dict)
    history_errors: int = 0  # scans that could not be stored (a full disk)


class DaemonCollector(Collector):
    def __init__(self, views: Callable[[], list[ServiceView]]) -> None:
        self._views = views

    def collect(self) -> Iterator[Metric]:
        views = self._views()
        g = _Families()
        for view in views:
            s = view.name
            g.target_up.add_metric([s], 1.0 if view.target_up else 0.0)
            g.drops.add_metric([s], float(view.kernel_drops))
            g.windows.add_metric([s], float(view.windows))
            for outcome in Outcome:
                g.scans.add_metric([s, outcome.value], float(view.scans.get(outcome, 0)))
            g.history_errors.add_metric([s], float(view.history_errors))
            if view.last is not None:
                _last_scan(g, s, view.last)
        yield from g.all()


class _Families:
    def __init__(self) -> None:
        p = "depdrill_"
        self.target_up = GaugeMetricFamily(
            p + "target_up", "1 while the service's namespace is found", labels=["service"]
        )
        self.drops = CounterMetricFamily(
            p + "capture_kernel_drops",
            "Packets the kernel dropped from capture",
            labels=["service"],
        )
        self.windows = CounterMetricFamily(
            p + "capture_windows", "Discovery capture windows completed", labels=["service"]
        )
        self.scans = CounterMetricFamily(
            p + "scans", "Scans since the daemon started, by outcome", labels=["service", "outcome"]
        )
        self.history_errors = CounterMetricFamily(
            p + "history_write_errors",
            "Scans that could not be stored in the history (a full disk)",
            labels=["service"],
        )
        self.outcome = GaugeMetricFamily(
            p + "scan_outcome", "1 for the last scan's outcome", labels=["service", "outcome"]
        )
        self.duration = GaugeMetricFamily(
            p + "scan_duration_seconds", "How long the last scan took", labels=["service"]
        )
        self.finished = GaugeMetricFamily(
            p + "scan_last_timestamp_seconds", "When the last scan ended", labels=["service"]
        )
        self.score = GaugeMetricFamily(
            p + "scan_score", "The last scan's resilience score (0-100)", labels=["service"]
        )
        self.dependencies = GaugeMetricFamily(
            p + "dependencies", "Dependencies in the last scan's graph", labels=["service"]
        )
        self.verdict = GaugeMetricFamily(
            p + "test_verdict",
            "1 for each test's verdict in the last scan, 0 for the other verdicts",
            labels=["service", "test", "dependency", "verdict"],
        )
        self.expiry = GaugeMetricFamily(
            p + "cert_expiry_timestamp_seconds",
            "When a dependency's certificate expires: the leaf, and the earliest in the chain",
            labels=["service", "dependency", "endpoint", "certificate"],
        )
        self.drift = GaugeMetricFamily(
            p + "drift_changes",
            "Changes between the last two scans, by kind",
            labels=["service", "kind"],
        )

    def all(self) -> list[Metric]:
        return [m for m in vars(self).values() if isinstance(m, Metric)]


def _last_scan(g: _Families, service: str, done: ScanDone) -> None:
    summary = done.stored.summary
    for outcome in Outcome:
        g.outcome.add_metric([service, outcome.value], 1.0 if summary.outcome == outcome else 0.0)
    g.duration.add_metric([service], done.duration_s)
    g.finished.add_metric([service], summary.ended.timestamp())
    if summary.score is not None:
        g.score.add_metric([service], float(summary.score))
    graph = done.stored.graph
    if graph is not None:
        dependencies = graph.dependencies()
        g.dependencies.add_metric([service], float(len(dependencies)))
        for dep in dependencies:
            for endpoint in dep.tls_endpoints:
                tls = endpoint.tls
                if tls is None:
                    continue
                where = f"{endpoint.address}:{endpoint.port}"
                leaf = (tls.path or tls.served)[:1]
                if leaf:
                    g.expiry.add_metric(
                        [service, dep.name, where, "leaf"], leaf[0].not_after.timestamp()
                    )
                earliest = [t for t in (tls.earliest_expiry_served, tls.earliest_expiry_path) if t]
                if earliest:
                    g.expiry.add_metric(
                        [service, dep.name, where, "earliest-in-chain"], min(earliest).timestamp()
                    )
    results = done.stored.results
    for test in results.tests if results is not None else []:
        for verdict in Verdict:
            g.verdict.add_metric(
                [service, test.id, test.dependency or "", verdict.value],
                1.0 if test.verdict == verdict else 0.0,
            )
    if done.drift is not None:
        for kind, count in done.drift.counts().items():
            g.drift.add_metric([service, kind], float(count))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would drown the daemon's own log lines."""


class _WSGIServer6(WSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """/metrics on a thread; `close()` stops it and frees the port."""

    def __init__(self, address: tuple[str, int], views: Callable[[], list[ServiceView]]) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DaemonCollector(views))
        self._server: WSGIServer = make_server(
            address[0],
            address[1],
            make_wsgi_app(registry),
            server_class=_WSGIServer6 if ":" in address[0] else WSGIServer,
            handler_class=_QuietHandler,
        )
        self._server.timeout = 0.5
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
