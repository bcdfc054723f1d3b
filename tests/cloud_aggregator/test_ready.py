"""`GET /ready` of the party and the coordinator (Kubernetes readiness probes): 200 while the
state directory takes writes, 503 ``not_ready`` with the reason (logged once) when it does
not, back to 200 once it does again; no token needed; ``/health`` stays 200 throughout."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
from fastapi.testclient import TestClient

from cloud_aggregator import coordinator, party
from cloud_aggregator.settings import CoordinatorSettings, PartySettings
from protocols.auth import make_credentials


@pytest.fixture
def creds(tmp_path):
    return make_credentials(tmp_path / "creds", ["h1"], 2)


def _party(tmp_path, creds):
    return party.create_app(PartySettings(index=0, parties=2, data_dir=tmp_path / "party", registry=creds))


def _coordinator(tmp_path, creds):
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"arch": "toy", "config": {}, "init_seed": 1, "spec": [["w", [4, 3]], ["b", [3]]]}))
    return coordinator.create_app(CoordinatorSettings(
        data_dir=tmp_path / "coord", registry=creds, key_file=creds.parent / "keys" / "coordinator.json",
        party_urls=["http://127.0.0.1:9", "http://127.0.0.1:10"], model_file=model))


@pytest.mark.parametrize("make", [_party, _coordinator], ids=["party", "coordinator"])
def test_ready_follows_the_state_directory(make, tmp_path, creds, caplog):
    app = make(tmp_path, creds)
    with TestClient(app) as client:
        data_dir = tmp_path / ("party" if make is _party else "coord")
        resp = client.get("/ready")
        assert resp.status_code == 200 and resp.json()["ready"] is True
        assert not [p for p in data_dir.iterdir() if p.name.startswith(".ready-probe-")]

        # the volume is gone (a file where the directory was: root ignores permission bits)
        shutil.move(data_dir, tmp_path / "moved")
        data_dir.write_text("not a directory")
        with caplog.at_level(logging.WARNING, logger="cloud_aggregator.readiness"):
            for _ in range(3):
                resp = client.get("/ready")
                assert resp.status_code == 503
                assert resp.json()["error"] == "not_ready" and str(data_dir) in resp.json()["detail"]
        assert len([r for r in caplog.records if "is not ready" in r.getMessage()]) == 1
        assert client.get("/health").status_code == 200

        data_dir.unlink()
        shutil.move(tmp_path / "moved", data_dir)
        assert client.get("/ready").status_code == 200


def test_party_ready_reports_its_mpc_group(tmp_path, creds):
    with TestClient(_party(tmp_path, creds)) as client:
        body = client.get("/ready").json()
    assert body == {"ready": True, "party_index": 0, "mpc": {"configured": False, "ready": False}}
