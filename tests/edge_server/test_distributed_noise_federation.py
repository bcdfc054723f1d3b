"""Distributed noise in the real path: the coordinator announces K and the minimum number of
participants, every `iomt edge federate` adds its 1/K share of the noise on top of DP-SGD, a
round with fewer participants fails closed, and a hospital that requires distributed noise
refuses a round config without K. Coordinator and parties are real processes over TLS."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from cloud_aggregator.store import load_global_share
from edge_server.training import ModelConfig, initial_state
from protocols.aggregation_messages import AggregateRequest
from iomt.local_cloud import LocalCloud, toy_state
from iomt.supervisor import spawn_iomt
from tests.utils.records import write_store

pytestmark = pytest.mark.integration

CFG = ModelConfig(dim=8, ehr_hidden=8, lstm_hidden=8, lstm_layers=1, text_layers=1, cnn_channels=(2, 4, 4),
                  text_vocab=64, text_len=12, signal_pool=25)
SIGMA, CLIP = 2.0, 0.5
NOISE_ARGS = ("--distributed-noise", "2", "--distributed-noise-multiplier", str(SIGMA),
              "--distributed-noise-clip", str(CLIP))


def _cloud(tmp_path: Path, hospitals: list[str], coord_args=(), **kw) -> LocalCloud:
    model = {"arch": "multimodal", "config": CFG.model_dump(mode="json"), "init_seed": 3}
    return LocalCloud.secagg(tmp_path, 2, hospitals, state=initial_state(CFG, 3), model=model,
                             coord_args=list(coord_args), **kw).start()


def _federate(cluster: LocalCloud, tmp_path: Path, hospital: str, seed: int, *extra: str):
    data = tmp_path / "edge" / hospital
    write_store(data, 24, seed=seed, hospital=hospital)
    return spawn_iomt("edge", "federate", "--data-dir", str(data), "--key-file",
                      str(tmp_path / f"creds/keys/{hospital}.json"), "--coordinator", cluster.coord_url,
                      *cluster.client_tls_args(hospital), "--epochs", "1", "--json", *extra,
                      log=tmp_path / f"{hospital}.log")


def test_k_hospitals_each_add_their_share_on_top_of_dp_sgd_and_the_round_aggregates(tmp_path):
    cluster = _cloud(tmp_path, ["h1", "h2"], NOISE_ARGS, round_timeout=300.0)
    try:
        procs = {h: _federate(cluster, tmp_path, h, i, "--distributed-noise") for i, h in enumerate(("h1", "h2"))}
        codes = {h: p.wait(600) for h, p in procs.items()}
        logs = {h: (tmp_path / f"{h}.log").read_text() for h in procs}
        assert codes == {"h1": 0, "h2": 0}, logs
        for h in procs:
            report = json.loads(next(line for line in logs[h].splitlines() if line.startswith("{")))
            metrics = report["rounds"][0]["train_metrics"]
            # patient-level DP-SGD as before, plus this hospital's 1/K of the variance
            assert metrics["dp"] == "sgd" and 0 < metrics["epsilon"] <= 8.0
            assert metrics["distributed_noise_hospitals"] == 2
            assert metrics["distributed_noise_std"] == pytest.approx(SIGMA * CLIP / 2 ** 0.5)
        client = cluster.client("h1")
        try:
            status = client.round_status(1)
        finally:
            client.close()
        assert status.state == "done" and status.participants == ["h1", "h2"]
        assert status.config.min_participants == 2 and status.config.distributed_noise.hospitals == 2
        assert status.aggregate_noise_multiplier == pytest.approx(SIGMA, rel=0.5)
        assert 0 < status.aggregate_epsilon < float("inf")
        assert load_global_share(cluster.party_dir(0))[0].participants == ["h1", "h2"]
    finally:
        cluster.stop()


def test_a_round_with_fewer_participants_than_k_fails_closed_and_nothing_is_published(tmp_path):
    cluster = LocalCloud.secagg(tmp_path, 2, ["h1", "h2"], round_timeout=6.0, coord_args=list(NOISE_ARGS)).start()
    try:
        clients = cluster.federated_clients()
        st = cluster.wait_round(clients["h1"], 1, states=("open",))
        assert st.config.distributed_noise_refusal() is None
        clients["h1"].upload(st.config, toy_state(1), 10)  # h2 never uploads
        st = cluster.wait_round(clients["h1"], 1)
        assert st.state == "failed", cluster.logs()
        assert "only 1 participants" in st.detail and "less than the announced noise" in st.detail
        assert cluster.metrics(cluster.coord_url, "coordinator")["too_few_participants"] == 1
        assert "failed closed" in cluster.log("coordinator")
        for i in range(2):  # no party was asked to aggregate: no global model anywhere
            assert not list((cluster.party_dir(i)).glob("global/*"))
            assert "aggregated round" not in cluster.log(f"party-{i}")
        assert clients["h1"].status().latest_version is None
        # a party, asked directly to aggregate fewer than the round's minimum, refuses too
        headers = {**cluster.signer("coordinator").headers("party-0"), "content-type": "application/json"}
        verify = cluster.client_tls("coordinator")
        held = httpx.get(f"{cluster.party_urls[0]}/rounds/1/receipts", headers=headers, verify=verify).json()
        req = AggregateRequest(config=st.config, participants=["h1"], denominator=10,
                               commitments={"h1": held["receipts"][0]["commitment"]})
        resp = httpx.post(f"{cluster.party_urls[0]}/rounds/1/aggregate", content=req.model_dump_json(),
                          headers=headers, verify=verify)
        assert resp.status_code == 409 and resp.json()["error"] == "too_few_participants", resp.text
        assert not list((cluster.party_dir(0)).glob("global/*"))
    finally:
        cluster.stop()


def test_a_hospital_requiring_distributed_noise_refuses_a_config_without_k(tmp_path):
    cluster = _cloud(tmp_path, ["h1"], round_timeout=300.0)  # announces no distributed noise
    try:
        proc = _federate(cluster, tmp_path, "h1", 0, "--distributed-noise")
        code = proc.wait(600)
        log = (tmp_path / "h1.log").read_text()
        assert code == 5, log
        assert "refusing to train" in log and "announces no distributed noise with K" in log
        assert not (tmp_path / "edge/h1/privacy_accountant.json").exists()  # refused before training
        for i in range(2):  # nothing was uploaded
            assert not (cluster.party_dir(i) / "rounds/r000001/h1.share").exists()
        client = cluster.client("h1")
        try:
            assert client.round_status(1).state == "open"
        finally:
            client.close()
    finally:
        cluster.stop()
