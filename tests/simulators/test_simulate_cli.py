"""`iomt simulate` end to end through a real Mosquitto: report shape and every modality on the wire."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from protocols.messages import ClinicalNote, EhrRecord, ImagingStudy, SignalFrame
from protocols.schema import SIGNAL_STREAMS
from iomt.mqtt_collector import Collector
from iomt.supervisor import run_iomt

pytestmark = pytest.mark.integration


def test_simulate_publishes_every_modality_and_reports(mosquitto, tmp_path):
    sub = Collector(mosquitto.port, pattern="iomt/hosp-b/#")
    report_path = tmp_path / "report.json"
    run_iomt("simulate", "--hospital", "hosp-b", "--broker", mosquitto.url, "--patients", "6", "--duration", "5",
             "--seed", "7", "--report", str(report_path), "--buffer-dir", str(tmp_path / "buf"), timeout=300)
    report = json.loads(report_path.read_text())
    assert report["patients"] == [f"hosp-b-p{i:04d}" for i in range(6)]
    assert report["unacknowledged"] == 0
    published = report["published"]
    assert set(SIGNAL_STREAMS) <= set(published) and {"study", "record", "note"} <= set(published)
    expected = sum(1 for p in report["patients"] for s in report["streams"][p]) * 5
    assert sum(published[s] for s in SIGNAL_STREAMS) == expected

    total = sum(published.values())
    assert sub.wait_for(lambda c: sum(1 for t, _, _ in c.messages
                                      if t.split("/")[-1] not in ("presence", "registration")) >= total, 60)
    got = sub.decoded()
    counts = Counter(t.stream for t, _ in got if t.stream not in ("presence", "registration"))
    assert counts == Counter(published)                          # every message arrived exactly once here
    kinds = {type(m) for _, m in got}
    assert {SignalFrame, ImagingStudy, EhrRecord, ClinicalNote} <= kinds
    for t, m in got:
        if isinstance(m, EhrRecord):
            assert m.condition() == report["labels"][m.patient_id]
        if isinstance(m, SignalFrame):
            owner = next(p for p, d in report["devices"].items() if d["wearable"] == m.device_id)
            assert m.stream in report["streams"][owner]
    regs = [m for t, m in got if t.stream == "registration" and t.device_class == "wearable"]
    assert {r.patient_id for r in regs} == {p for p in report["patients"] if report["streams"][p]}
    sub.close()


def test_simulate_report_is_deterministic_under_seed(mosquitto, tmp_path):
    reports = []
    for run in range(2):
        path = tmp_path / f"r{run}.json"
        run_iomt("simulate", "--hospital", "hosp-c", "--broker", mosquitto.url, "--patients", "3",
                 "--duration", "2", "--seed", "9", "--report", str(path), "--start-ts", "1700000000", timeout=300)
        r = json.loads(path.read_text())
        r.pop("wall_s")
        reports.append(r)
    assert reports[0] == reports[1]
