"""`iomt edge status` (JSON and human forms) and the daemon's /healthz and /metrics endpoint."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from edge_server.ingest.ingestor import Ingestor
from edge_server.ingest.metrics import EdgeMetrics, MetricsServer, create_app
from edge_server.ingest.sqlite_store import SqliteStore
from edge_server.ingest.status import render
from edge_server.ingest.store import Batch
from simulators import payloads as b
from iomt.supervisor import run_iomt


def _filled(path):
    ing, batch = Ingestor("h1"), Batch()
    for msg in [b.registration("w-1", "p1"), b.registration("nt-1", "ward", "notes"),
                *[b.frame("w-1", s, i) for i in range(4) for s in ("ecg", "ppg")],
                b.note("nt-1", "p1", "n1"), b.frame("w-2", "ecg", 0), (b.topic("w-1", "ecg"), b"junk-not-a-frame")]:
        ing.handle(msg[0], msg[1], batch, 1_700_000_000.0)
    with SqliteStore(path) as store:
        store.set_meta("hospital", "h1")
        result = store.commit(batch)
    return batch, result


@pytest.mark.integration
def test_status_json_reports_stored_rejected_and_last_seen(tmp_path):
    _filled(tmp_path)

    out = json.loads(run_iomt("edge", "status", "--data-dir", str(tmp_path), "--json").stdout)

    assert out["stored"]["by_stream"] == {"ecg": 4, "note": 1, "ppg": 4}
    assert out["stored"]["by_modality"] == {"signals": 8, "text": 1}
    assert out["stored"]["by_device"] == {"nt-1": 1, "w-1": 8} and out["stored"]["total"] == 9
    assert out["rejected"] == {"bad_magic": 1, "unknown_device": 1}
    assert out["last_seen"] == {"nt-1": 1_700_000_000.0, "w-1": 1_700_000_000.0}
    assert out["hospital"] == "h1" and out["received"] == 13


@pytest.mark.integration
def test_status_human_form_and_missing_store(tmp_path):
    _filled(tmp_path)

    text = run_iomt("edge", "status", "--data-dir", str(tmp_path)).stdout
    missing = run_iomt("edge", "status", "--data-dir", str(tmp_path / "none"), check=False)

    assert "9 messages stored" in text and "bad_magic 1" in text
    assert "w-1" in text and "patient p1" in text
    assert missing.returncode == 1 and "no edge store" in missing.stderr


def test_render_without_devices():
    with SqliteStore(":memory:") as store:
        assert "0 messages stored" in render(store.status())


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_endpoint_serves_health_and_prometheus_counters(tmp_path):
    batch, result = _filled(tmp_path)
    metrics, state = EdgeMetrics(), {"ok": False}
    server = MetricsServer(create_app(metrics, lambda: dict(state)), port=0).start()
    try:
        unhealthy = _get(server.port, "/healthz")
        state["ok"] = True
        metrics.observe_commit(batch, result, 0.003)
        healthy = _get(server.port, "/healthz")
        code, text = _get(server.port, "/metrics")
        missing = _get(server.port, "/nope")
    finally:
        server.stop()

    assert unhealthy[0] == 503 and json.loads(unhealthy[1]) == {"ok": False}
    assert healthy[0] == 200
    assert code == 200
    assert 'iomt_edge_stored_total{stream="ecg"} 4.0' in text
    assert 'iomt_edge_rejected_total{reason="unknown_device"} 1.0' in text
    assert "iomt_edge_received_total 13.0" in text and "iomt_edge_duplicates_total 0.0" in text
    assert missing[0] == 404
