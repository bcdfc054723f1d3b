"""Parties and the coordinator, as real processes with a metrics port, serve Prometheus text
whose counters follow a round, a download, refused uploads, refused tokens and a refused
inference; the metrics carry no hospital name and only bounded labels; and the services,
run without ``-v``, log one INFO line per round step and per request."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_aggregator.inference.messages import TensorShare
from iomt.local_cloud import TOY_MODEL, LocalCloud, toy_state

pytestmark = pytest.mark.integration

#: Every label a cloud metric may carry: code-defined slugs and party indices, nothing free-form.
ALLOWED_LABELS = {"reason", "outcome", "trigger", "call", "party", "le", "iomt_coordinator_round_state"}


def _samples(text: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _value(samples: list, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` (0 when absent: a labelled counter appears on its first increment)."""
    hits = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) <= 1, (name, labels, hits)
    return hits[0] if hits else 0.0


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """Two parties and the coordinator (no ``-v``): scraped idle, then round 1 done with h1, whose
    global model h1 downloads."""
    c = LocalCloud(tmp_path_factory.mktemp("prom"), 2, ["h1"], model=TOY_MODEL, rounds=1, round_timeout=600.0,
                   metrics=True).start()
    client = c.client("h1")
    try:
        idle = [_samples(c.scrape(p)) for p in c.party_metrics_ports]
        client.register()
        cfg = c.wait_round(client, 1, states=("open",)).config
        sent = client.upload(cfg, toy_state(1), 5)
        assert c.wait_round(client, 1).state == "done", c.logs()
        client.fetch_global(1)
        yield c, idle, sent
    finally:
        client.close()
        c.stop()


def test_a_round_moves_the_counters_and_refusals_count_by_reason(cloud):
    c, idle, sent = cloud
    party0 = c.party_urls[0]
    token = c.signer("h1").headers("party-0")
    junk = httpx.put(f"{party0}/rounds/1/share", content=b"junk", headers=token)
    no_token = httpx.put(f"{party0}/rounds/1/share", content=b"junk")
    coord_no_token = httpx.get(f"{c.coord_url}/status")
    share = TensorShare.from_array(np.zeros((1, 4), dtype=np.int64)).model_dump()
    infer = httpx.post(f"{party0}/inference/v1/predict", headers=token,
                       json={"request_id": "req-000001", "inputs": {"x": share}})
    parties = [_samples(c.scrape(p)) for p in c.party_metrics_ports]
    coord = _samples(c.scrape(c.coord_metrics_port))

    assert [_value(s, "iomt_party_uploads_total", outcome="stored") for s in idle] == [0, 0]
    assert [_value(s, "iomt_party_mpc_ready") for s in idle] == [0, 0]  # started without mpc_master
    assert junk.status_code == 400 and no_token.status_code == 401 and coord_no_token.status_code == 401
    assert infer.status_code == 404 and infer.json()["error"] == "not_configured"
    p0 = parties[0]
    assert [_value(s, "iomt_party_uploads_total", outcome="stored") for s in parties] == [1, 1]
    assert sum(_value(s, "iomt_party_upload_bytes_total") for s in parties) == sent
    assert [_value(s, "iomt_party_rounds_aggregated_total") for s in parties] == [1, 1]
    assert [_value(s, "iomt_party_aggregation_seconds_count") for s in parties] == [1, 1]
    assert _value(p0, "iomt_party_global_downloads_total") == 1
    assert _value(p0, "iomt_party_uploads_refused_total", reason=junk.json()["error"]) == 1
    assert _value(p0, "iomt_party_requests_refused_total", reason=junk.json()["error"]) == 1
    assert _value(p0, "iomt_party_tokens_refused_total", reason="missing_token") == 1
    assert _value(p0, "iomt_party_inference_requests_total") == 1
    assert _value(p0, "iomt_party_inference_errors_total", reason="not_configured") == 1
    assert _value(p0, "iomt_party_parties") == 2 and _value(p0, "iomt_party_mpc_configured") == 0
    assert _value(coord, "iomt_coordinator_rounds_opened_total") == 1
    assert _value(coord, "iomt_coordinator_rounds_closed_total", trigger="all_in") == 1
    assert _value(coord, "iomt_coordinator_rounds_done_total") == 1
    assert _value(coord, "iomt_coordinator_aggregation_seconds_count") == 1
    assert _value(coord, "iomt_coordinator_round_seconds_count") == 1
    assert _value(coord, "iomt_coordinator_round") == 1
    assert _value(coord, "iomt_coordinator_round_state", iomt_coordinator_round_state="done") == 1
    assert _value(coord, "iomt_coordinator_round_participants") == 1
    assert _value(coord, "iomt_coordinator_hospitals_registered") == 1
    assert _value(coord, "iomt_coordinator_parties") == 2 and _value(coord, "iomt_coordinator_parties_answering") == 2
    assert _value(coord, "iomt_coordinator_tokens_refused_total", reason="missing_token") == 1
    for samples in [*parties, coord]:  # counts only: no hospital named, no free-form label
        assert {k for s in samples for k in s.labels} <= ALLOWED_LABELS
        assert "h1" not in {v for s in samples for v in s.labels.values()}


def test_services_log_each_round_step_and_request_at_info_without_verbose(cloud):
    c = cloud[0]

    party0, coord = c.log("party-0"), c.log("coordinator")

    assert "party 0 stored round 1 share from h1" in party0
    assert "party 0 aggregated round 1" in party0
    assert "party 0 sends its share of global model v1 to h1" in party0
    assert "round 1 opened" in coord and "round 1 closing" in coord and "round 1 done" in coord
    assert "metrics on http://127.0.0.1:" in party0 and "metrics on http://127.0.0.1:" in coord


def test_mpc_group_state_and_inference_latency_are_exported(tmp_path):
    import json

    import torch

    from cloud_aggregator.inference.client import predict
    from cloud_aggregator.inference.publish import publish_shared_model
    from protocols.model import ModelConfig, build_model, state_to_numpy

    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=16)).eval()
    c = LocalCloud(tmp_path, 2, ["hospital-a"], mpc=True, metrics=True)
    publish_shared_model(c.party_dirs, [state_to_numpy(model)], [1], "multimodal", json.loads(model.cfg.to_json()))
    try:
        c.start()
        feats = np.random.default_rng(0).normal(size=(2, 4, 16)).astype(np.float32)
        predict(c.party_urls, c.signer(), {"features": feats, "mask": np.ones((2, 4), dtype=np.float32)})
        parties = [_samples(c.scrape(p)) for p in c.party_metrics_ports]
        logs = [c.log(f"party-{i}") for i in range(2)]
    finally:
        c.stop()

    for samples in parties:
        assert _value(samples, "iomt_party_mpc_configured") == 1 and _value(samples, "iomt_party_mpc_ready") == 1
        assert _value(samples, "iomt_party_inference_requests_total") == 1
        assert _value(samples, "iomt_party_inference_seconds_count") == 1
        assert _value(samples, "iomt_party_inference_seconds_sum") > 0
    assert all("MPC worker joined the group of 2 parties" in log for log in logs)
    assert all("answered inference" in log for log in logs)
