"""End to end: `iomt simulate` -> Mosquitto -> `iomt edge run` -> `iomt edge status` and records."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edge_server.dataset.records import load_records
from edge_server.dataset.preprocess import patient_record_from_raw
from edge_server.ingest.sqlite_store import SqliteStore
from protocols.schema import CONDITIONS, WINDOW_SAMPLES, SIGNAL_CHANNELS
from tests.edge_server.harness import metrics_text, spawn_edge, wait_status
from iomt.supervisor import run_iomt, stop

pytestmark = pytest.mark.integration


def _fresh_records(data) -> int:
    """Patients whose cached, preprocessed record is up to date with their rows."""
    with SqliteStore(data) as store:
        return sum(1 for p in store.patients() if (store.cached_record(p) or ("",))[0] == store.patient_version(p))


def test_simulated_hospital_is_stored_exactly_as_published(mosquitto, tmp_path):
    data, report_path = tmp_path / "data", tmp_path / "report.json"
    edge, port = spawn_edge(mosquitto, data, tmp_path / "edge.log", "hA", "--preprocess-interval", "0.5")
    try:
        run_iomt("simulate", "--hospital", "hA", "--broker", mosquitto.url, "--patients", "4", "--duration", "20",
                 "--seed", "3", "--report", str(report_path), "--buffer-dir", str(tmp_path / "buf"), timeout=300)
        report = json.loads(report_path.read_text())
        expected = sum(report["published"].values())
        wait_status(data, lambda s: s["stored"]["total"] >= expected, timeout=120)
        stored_metrics = metrics_text(port)
        deadline = time.monotonic() + 60  # the daemon's background preprocessing catches up
        while time.monotonic() < deadline and _fresh_records(data) < len(report["patients"]):
            time.sleep(0.2)
        fresh = _fresh_records(data)
    finally:
        assert stop(edge) == 0  # SIGTERM: final commit, clean exit

    assert fresh == len(report["patients"])
    status = json.loads(run_iomt("edge", "status", "--data-dir", str(data), "--json").stdout)
    assert status["stored"]["by_stream"] == report["published"]
    assert status["rejected"] == {} and status["duplicates"] == 0
    assert set(status["last_seen"]) == set(status["devices"])
    assert f'iomt_edge_stored_total{{stream="ecg"}} {float(report["published"]["ecg"])}' in stored_metrics

    records = {r.patient_id: r for r in load_records(data)}
    assert set(records) == set(report["patients"])
    for pid, rec in records.items():
        if "ehr" in report["modalities"][pid]:
            assert rec.label == CONDITIONS.index(report["labels"][pid])
        if report["streams"][pid]:
            assert rec.signal_windows.shape[1:] == (WINDOW_SAMPLES, len(SIGNAL_CHANNELS))
            assert len(rec.signal_windows) == 2  # 20 s of signal, 8 s windows
            assert np.isfinite(rec.signal_windows).all()
        assert set(rec.modalities()) == set(report["modalities"][pid])

    # The same cohort generated in-process and preprocessed by the same pure function gives
    # the same records as the MQTT path (up to float32 frames and DICOM integer pixels).
    from simulators.cohort import generate_cohort, hospital_profile

    for p in generate_cohort("hA", 4, 3, 20.0, profile=hospital_profile("hA", None)):
        direct, stored = patient_record_from_raw(p.patient_id, "hA", p.streams, p.image, p.ehr, p.note), \
            records[p.patient_id]
        assert (direct.label, direct.note, direct.modalities()) == (stored.label, stored.note, stored.modalities())
        if direct.signal_windows is not None:
            assert np.allclose(direct.signal_windows, stored.signal_windows, atol=1e-4)
        if direct.image is not None:
            assert np.allclose(direct.image, stored.image, atol=2e-2)
        if direct.ehr is not None:
            assert np.allclose(direct.ehr, stored.ehr, atol=1e-3, equal_nan=True)
