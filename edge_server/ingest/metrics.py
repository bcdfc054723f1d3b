"""Prometheus counters of the edge daemon and its HTTP endpoint (``/healthz``, ``/metrics``).

Counters are updated only after a batch is committed, so they never run ahead of the store.
They restart from zero with the process (as Prometheus expects); the store's totals, which
survive restarts, are what ``iomt edge status`` reports.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from edge_server.ingest.store import Batch, CommitResult

log = logging.getLogger(__name__)


class EdgeMetrics:
    """One daemon's metrics in their own registry (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
