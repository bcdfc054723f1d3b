"""The demo's report says the epsilon each hospital spent, its unit and delta, and what it means
(built from a report as `iomt demo` gathers it; no processes)."""
from __future__ import annotations

from iomt.demo_report import _markdown, privacy_summary


def _report(metrics: dict) -> dict:
    rounds = [{"uploaded_bytes": 10, "train_metrics": {"dp": "sgd", "epsilon": 5.0, "delta": 1e-5,
                                                        "privacy_unit": "patient", "epsilon_budget": 8.0}},
              {"uploaded_bytes": 10, "train_metrics": metrics}]
    return {"settings": {"patients": 10, "parties": 2, "rounds": 2, "epochs": 1, "dp": "sgd", "epsilon": 8.0},
            "hospitals": ["h1"], "federation": {"h1": {"rounds": rounds, "global": {"val": {}}}}}


def test_the_report_prints_the_last_rounds_epsilon_with_its_unit_delta_and_meaning():
    report = _report({"dp": "sgd", "epsilon": 7.93, "delta": 1e-5, "privacy_unit": "patient",
                      "epsilon_budget": 8.0})
    line = privacy_summary(report)
    assert "epsilon spent (patient level, delta = 1e-05): h1 7.93 of 8" in line
    assert "e^epsilon times more" in line and "one patient's records" in line
    md = _markdown(report, {})
    assert line in md and "| h1 | 2 | 0.00 | 7.93 |" in md


def test_without_dp_the_report_says_epsilon_is_infinite():
    report = _report({"dp": "off"})
    report["federation"]["h1"]["rounds"] = report["federation"]["h1"]["rounds"][1:]
    assert "no differential privacy (epsilon = inf)" in privacy_summary(report)
