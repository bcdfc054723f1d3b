"""`iomt edge federate` trains with patient-level DP-SGD by default: every hospital's ledger
stays within epsilon 8 over all planned rounds, the coordinator's round status shows the epsilon
each hospital reports, and `iomt edge status` shows the hospital's own."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_server.training import ModelConfig, initial_state
from iomt.supervisor import run_iomt, spawn_iomt
from tests.utils.records import write_store

HOSPITALS = ("h1", "h2")
ROUNDS = 2
CFG = ModelConfig(dim=8, ehr_hidden=8, lstm_hidden=8, lstm_layers=1, text_layers=1, cnn_channels=(2, 4, 4),
                  text_vocab=64, text_len=12, signal_pool=25)


@pytest.mark.integration
def test_federate_defaults_to_dp_sgd_and_the_coordinator_shows_each_hospitals_epsilon(tmp_path: Path):
    from iomt.local_cloud import LocalCloud
    model = {"arch": "multimodal", "config": CFG.model_dump(mode="json"), "init_seed": 3}
    cluster = LocalCloud.secagg(tmp_path, 2, list(HOSPITALS), rounds=ROUNDS, round_timeout=300.0,
                                state=initial_state(CFG, 3), model=model).start()
    try:
        dirs = {h: tmp_path / "edge" / h for h in HOSPITALS}
        procs = {}
        for i, (h, d) in enumerate(dirs.items()):
            write_store(d, 24, seed=i, hospital=h)
            procs[h] = spawn_iomt("edge", "federate", "--data-dir", str(d), "--key-file",
                                  str(tmp_path / f"creds/keys/{h}.json"), "--coordinator", cluster.coord_url,
                                  *cluster.client_tls_args(h), "--epochs", "1", "--json",
                                  log=tmp_path / f"{h}.log")
        codes = {h: p.wait(600) for h, p in procs.items()}
        logs = {h: (tmp_path / f"{h}.log").read_text() for h in HOSPITALS}
        assert codes == {h: 0 for h in HOSPITALS}, logs
        report = json.loads(next(line for line in logs["h1"].splitlines() if line.startswith("{")))
        eps = [r["train_metrics"]["epsilon"] for r in report["rounds"]]
        # Assert: DP-SGD, epsilon growing each round to at most 8 over the planned run, patient level
        assert [r["train_metrics"]["dp"] for r in report["rounds"]] == ["sgd"] * ROUNDS
        assert eps[0] < eps[1] <= 8.0 and eps[1] > 7.0
        client = cluster.client("h1")
        try:
            status = client.round_status(ROUNDS)
            # a malformed report or one for a round that does not exist is refused, nothing changes
            headers = {**client.signer.headers("coordinator"), "content-type": "application/json"}
            bad = client.http.post(f"{cluster.coord_url}/rounds/{ROUNDS}/privacy", headers=headers,
                                   content=b'{"epsilon": -1, "delta": 1e-5}')
            unknown = client.http.post(f"{cluster.coord_url}/rounds/99/privacy", headers=headers,
                                       content=b'{"epsilon": 1.0, "delta": 1e-5}')
            assert (bad.status_code, unknown.status_code) == (422, 404)
            assert client.round_status(ROUNDS).privacy == status.privacy
        finally:
            client.close()
        assert set(status.privacy) == set(HOSPITALS)
        assert status.privacy["h1"].epsilon == pytest.approx(eps[1])
        assert status.privacy["h1"].unit == "patient" and status.privacy["h1"].delta == 1e-5
        shown = json.loads(run_iomt("edge", "status", "--data-dir", str(dirs["h1"]), "--json").stdout)
        assert shown["privacy"]["epsilon"] == pytest.approx(eps[1]) and shown["privacy"]["rounds"] == ROUNDS
        assert "privacy: epsilon" in run_iomt("edge", "status", "--data-dir", str(dirs["h1"])).stdout
    finally:
        cluster.stop()
