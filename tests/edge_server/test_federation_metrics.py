"""The edge's metrics port reports what ``iomt edge federate`` (a process of its own) left in the
data directory: ε spent per hospital with its δ and budget, DP rounds, the newest round shared."""
from __future__ import annotations

import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from edge_server.ingest.metrics import EdgeMetrics, MetricsServer, create_app
from edge_server.training.privacy import PrivacyAccountant


def _scrape(metrics: EdgeMetrics) -> dict[tuple[str, tuple], float]:
    server = MetricsServer(create_app(metrics, lambda: {"ok": True}), port=0).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        server.stop()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_privacy_budget_and_rounds_are_read_from_the_ledger_at_scrape_time(tmp_path):
    metrics = EdgeMetrics(tmp_path, "hospital-a")
    before = _scrape(metrics)
    accountant = PrivacyAccountant.for_data_dir(tmp_path, delta=1e-5, epsilon_budget=8.0)
    accountant.record_round(2.0)
    accountant.record_round(2.0)
    (tmp_path / "federation" / "r000003-0123456789abcdef01234567").mkdir(parents=True)  # PendingUploads' folder

    after = _scrape(metrics)

    h = (("hospital", "hospital-a"),)
    assert ("iomt_edge_privacy_epsilon", (("hospital", "hospital-a"), ("unit", "patient"))) not in before
    assert before[("iomt_edge_privacy_ledger_ok", h)] == 1
    eps = after[("iomt_edge_privacy_epsilon", (("hospital", "hospital-a"), ("unit", "patient")))]
    assert math.isclose(eps, accountant.epsilon(), rel_tol=1e-6) and eps > 0
    assert after[("iomt_edge_privacy_delta", h)] == 1e-5
    assert after[("iomt_edge_privacy_epsilon_budget", h)] == 8.0
    assert after[("iomt_edge_privacy_rounds", h)] == 2
    assert after[("iomt_edge_federation_round", h)] == 3


def test_an_unreadable_ledger_shows_as_not_ok_and_the_endpoint_keeps_serving(tmp_path):
    (tmp_path / "privacy_accountant.json").write_text("{not json")

    got = _scrape(EdgeMetrics(tmp_path, "hospital-a"))

    assert got[("iomt_edge_privacy_ledger_ok", (("hospital", "hospital-a"),))] == 0
    assert not any(name == "iomt_edge_privacy_epsilon" for name, _ in got)
    assert ("iomt_edge_received_total", ()) in got
