"""Prometheus counters of the edge daemon and its HTTP endpoint (``/healthz``, ``/metrics``).

Counters are updated only after a batch is committed, so they never run ahead of the store.
They restart from zero with the process (as Prometheus expects); the store's totals, which
survive restarts, are what ``iomt edge status`` reports.

``iomt edge federate`` runs as a process of its own; what it leaves in the shared data
directory (the privacy ledger, the newest round it shared) is read at scrape time by
:class:`FederationCollector`. Only counts and ε/δ: no patient, device or key.
"""
from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily

from edge_server.ingest.store import Batch, CommitResult

log = logging.getLogger(__name__)

#: The privacy ledger under the data directory (edge_server.training.privacy.ACCOUNTANT_FILE;
#: not imported: that module loads torch).
LEDGER_FILE = "privacy_accountant.json"
#: Where ``iomt edge federate`` keeps the sharing of the round in flight (PendingUploads).
FEDERATION_DIR = "federation"


class FederationCollector:
    """Privacy budget and training rounds of ``iomt edge federate``, read from ``data_dir`` at
    each scrape (``iomt_edge_privacy_*``, ``iomt_edge_federation_round``)."""

    def __init__(self, data_dir: str | Path, hospital: str) -> None:
        self.data_dir, self.hospital = Path(data_dir), hospital

    def _families(self) -> dict[str, GaugeMetricFamily]:
        h = ["hospital"]
        return {
            "ok": GaugeMetricFamily("iomt_edge_privacy_ledger_ok", "1 if the privacy ledger is absent or "
                                    "readable, 0 if it is unreadable (federate refuses to train)", labels=h),
            "epsilon": GaugeMetricFamily("iomt_edge_privacy_epsilon", "Privacy budget spent: epsilon at the "
                                         "ledger's delta over every released round (+Inf: no noise)",
                                         labels=["hospital", "unit"]),
            "delta": GaugeMetricFamily("iomt_edge_privacy_delta", "The delta of iomt_edge_privacy_epsilon", labels=h),
            "budget": GaugeMetricFamily("iomt_edge_privacy_epsilon_budget", "Epsilon no round may exceed (the "
                                        "target of federate's last round)", labels=h),
            "rounds": GaugeMetricFamily("iomt_edge_privacy_rounds", "Training rounds released under DP (in the "
                                        "ledger, across federations)", labels=h),
            "round": GaugeMetricFamily("iomt_edge_federation_round", "Newest federation round this hospital "
                                       "trained and shared", labels=h),
        }

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families().values()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam, h = self._families(), [self.hospital]
        path = self.data_dir / LEDGER_FILE
        ok = 1.0
        if path.exists():
            try:
                ledger = json.loads(path.read_text())
                epsilon = float(ledger["epsilon"]) if ledger.get("epsilon") is not None else math.inf
                fam["epsilon"].add_metric([self.hospital, str(ledger.get("unit", "patient"))], epsilon)
                fam["delta"].add_metric(h, float(ledger["delta"]))
                fam["rounds"].add_metric(h, float(len(ledger["rounds"])))
                if ledger.get("epsilon_budget") is not None:
                    fam["budget"].add_metric(h, float(ledger["epsilon_budget"]))
            except (OSError, ValueError, KeyError, TypeError) as err:
                ok = 0.0
                fam = self._families()  # nothing half-read
                log.warning("privacy ledger %s is unreadable: %s", path, err)
        fam["ok"].add_metric(h, ok)
        rounds = [int(p.name[1:7]) for p in (self.data_dir / FEDERATION_DIR).glob("r[0-9]*")
                  if p.name[1:7].isdigit()] if (self.data_dir / FEDERATION_DIR).is_dir() else []
        if rounds:
            fam["round"].add_metric(h, float(max(rounds)))
        yield from fam.values()


class EdgeMetrics:
    """One daemon's metrics in their own registry (no process-global state); with ``data_dir``,
    also federate's privacy budget and rounds (:class:`FederationCollector`)."""

    def __init__(self, data_dir: str | Path | None = None, hospital: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if data_dir is not None:
            r.register(FederationCollector(data_dir, hospital))
        self.received = Counter("iomt_edge_received", "MQTT deliveries handled", registry=r)
        self.stored = Counter("iomt_edge_stored", "Messages stored as received", ["stream"], registry=r)
        self.rejected = Counter("iomt_edge_rejected", "Messages rejected", ["reason"], registry=r)
        self.duplicates = Counter("iomt_edge_duplicates", "Redelivered messages already stored", registry=r)
        self.commits = Counter("iomt_edge_commits", "Store commits (each followed by its acks)", registry=r)
        self.commit_seconds = Histogram("iomt_edge_commit_seconds", "Time to commit one batch", registry=r,
                                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.connected = Gauge("iomt_edge_broker_connected", "1 while connected and subscribed", registry=r)
        self.reconnects = Counter("iomt_edge_reconnects", "Connections to the broker after the first",
                                  registry=r)
        self.last_commit = Gauge("iomt_edge_last_commit_timestamp_seconds", "Unix time of the last commit",
                                 registry=r)

    def observe_commit(self, batch: Batch, result: CommitResult, seconds: float) -> None:
        self.received.inc(batch.received)
        for stream, n in result.stored.items():
            self.stored.labels(stream=stream).inc(n)
        for rej in batch.rejections:
            self.rejected.labels(reason=rej.reason).inc()
        for _, rej in result.refused:
            self.rejected.labels(reason=rej.reason).inc()
        if result.duplicates:
            self.duplicates.inc(result.duplicates)
        self.commits.inc()
        self.commit_seconds.observe(seconds)
        self.last_commit.set(result.committed_at)


def create_app(metrics: EdgeMetrics, health: Callable[[], dict]) -> Callable:
    """WSGI app: ``/healthz`` (JSON from ``health()``; 503 unless ``ok``) and ``/metrics``."""
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return prometheus(environ, start_response)
        if path == "/healthz":
            state = health()
            body = json.dumps(state).encode()
            start_response("200 OK" if state.get("ok") else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found; try /healthz or /metrics\n"]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        log.debug("http %s", format % args)


class MetricsServer:
    """Serves :func:`create_app` on ``host:port`` from a daemon thread (port 0 picks a free one)."""

    def __init__(self, app: Callable, host: str = "127.0.0.1", port: int = 0) -> None:
        self._httpd = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="edge-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
