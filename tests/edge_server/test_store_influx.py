"""The optional InfluxDB sink, against a local stand-in for InfluxDB 2's /api/v2/write endpoint.

There is no InfluxDB 2 server here: the stub below accepts line protocol like the real
endpoint (204 No Content), and fails the first write with 503 to exercise the retries.
"""
from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from edge_server.ingest.influx import MEASUREMENT, InfluxSink
from edge_server.ingest.ingestor import Ingestor
from edge_server.ingest.settings import InfluxSettings
from edge_server.ingest.store import Batch
from simulators import payloads as b


class _StubInflux(BaseHTTPRequestHandler):
    fail_first = 1
    lines: list[str] = []
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        url = urlparse(self.path)
        type(self).requests.append({"path": url.path, "query": parse_qs(url.query),
                                    "auth": self.headers.get("Authorization")})
        if url.path != "/api/v2/write":
            self.send_response(404)
        elif type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.send_header("Retry-After", "0")
        else:
            type(self).lines.extend(body.decode().splitlines())
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    _StubInflux.fail_first, _StubInflux.lines, _StubInflux.requests = 1, [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubInflux)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_sink_batches_frames_and_retries_a_failed_write(stub):
    ing, batch = Ingestor("h1"), Batch()
    for msg in [b.registration("w-1", "p1"), *[b.frame("w-1", s, i) for i in range(30) for s in ("ecg", "acc")]]:
        ing.handle(msg[0], msg[1], batch, 1.0)
    settings = InfluxSettings(enabled=True, url=f"http://127.0.0.1:{stub.server_port}", token="t0k",
                              org="o", bucket="bk", batch_size=25, flush_interval_ms=100, retry_interval_ms=50)

    sink = InfluxSink(settings, "h1")
    sink.write_frames(batch.frames[:40])
    sink.write_frames(batch.frames[40:])
    deadline = time.monotonic() + 30
    while len(_StubInflux.lines) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    sink.close()

    assert _StubInflux.fail_first == 0  # the 503 was served, and its batch still arrived:
    assert len(_StubInflux.lines) == 60 and len(set(_StubInflux.lines)) == 60
    assert len(_StubInflux.requests) >= 4  # batches of <= 25 points, plus the retried one
    first = _StubInflux.requests[0]
    assert first["query"]["bucket"] == ["bk"] and first["query"]["org"] == ["o"] and first["auth"] == "Token t0k"
    ecg = [line for line in _StubInflux.lines if "stream=ecg" in line]
    assert len(ecg) == 30 and all(line.startswith(f"{MEASUREMENT},") for line in ecg)
    assert "device=w-1" in ecg[0] and "patient=p1" in ecg[0] and "mean_0=" in ecg[0]
    acc = next(line for line in _StubInflux.lines if "stream=acc" in line)
    assert "max_2=" in acc  # three accelerometer axes
    assert sink.failed == 0
