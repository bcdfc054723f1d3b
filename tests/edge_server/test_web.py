"""The clinician's page in-process (FastAPI's test client): sign-in, CSRF, search, audit, errors."""
from __future__ import annotations

import json
import re

import pytest
import torch
from fastapi.testclient import TestClient

from edge_server.training import save_model
from edge_server.web import Accounts, AccountError, WebSettings
from protocols.model import ModelConfig, build_model, state_to_numpy
from tests.utils.clinic import write_full_store
from iomt.supervisor import free_port, run_iomt

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    d = tmp_path_factory.mktemp("edge")
    ids = write_full_store(d, 25, seed=1)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16)
    save_model(d / "models", cfg, state_to_numpy(build_model(cfg).eval()), name="global", info={"version": 1})
    Accounts(d).add("alice", PASSWORD)
    return d, ids


def _client(edge_dir, **kw) -> TestClient:
    from iomt.edge_web import build_app
    return TestClient(build_app(WebSettings(data_dir=edge_dir, **kw)), base_url="http://127.0.0.1")


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def _sign_in(client: TestClient, password: str = PASSWORD):
    token = _csrf(client.get("/login").text)
    return client.post("/login", data={"username": "alice", "password": password, "csrf": token, "next": "/patients"},
                       follow_redirects=False)


def test_sign_in_search_paging_and_audit(edge):
    edge_dir, ids = edge
    client = _client(edge_dir)
    # not signed in: every page sends to the sign-in form
    assert client.get("/patients/" + ids[0], follow_redirects=False).headers["location"].startswith("/login")
    resp = _sign_in(client, "wrong password!")
    assert resp.status_code == 401 and "Wrong user name or password" in resp.text
    resp = _sign_in(client)
    assert resp.status_code == 303 and "iomt_session" in resp.cookies
    set_cookie = resp.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    page1 = client.get("/patients").text
    assert "25 patients" in page1 and ids[0] in page1 and ids[20] not in page1 and "Page 1 of 2" in page1
    assert ids[20] in client.get("/patients?page_no=1").text
    found = client.get("/patients?q=p0013").text
    assert "1 patient matching" in found and ids[13] in found and ids[12] not in found
    view = client.get(f"/patients/{ids[4]}")
    assert view.status_code == 200 and "Heart rate" in view.text and "/min" in view.text and "<polyline" in view.text
    assert client.get(f"/patients/{ids[4]}/image.png").content[:4] == b"\x89PNG"
    assert client.get("/patients/nobody").status_code == 404
    assert view.headers["content-security-policy"].startswith("default-src 'self'")
    entries = [json.loads(x) for x in (edge_dir / "audit" / "web.jsonl").read_text().splitlines()]
    assert {"user": "alice", "path": f"/patients/{ids[4]}", "status": 200, "patient": ids[4]}.items() <= next(
        e for e in entries if e["path"] == f"/patients/{ids[4]}").items()
    assert any(e["path"] == "/login" and e["status"] == 401 and e["attempted_user"] == "alice" for e in entries)


def test_csrf_and_unreachable_cloud(edge):
    edge_dir, ids = edge
    creds = edge_dir.parent / "creds"
    from protocols.auth import make_credentials
    make_credentials(creds, ["h0"], 2)
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    client = _client(edge_dir, parties=dead, key_file=creds / "keys" / "h0.json")
    _sign_in(client)
    view = client.get(f"/patients/{ids[2]}").text
    assert client.post(f"/patients/{ids[2]}/ask", data={"csrf": "forged"}).status_code == 403
    resp = client.post(f"/patients/{ids[2]}/ask", data={"csrf": _csrf(view)})
    assert resp.status_code == 200
    assert "The cloud is unreachable" in resp.text and 'data-kind="unreachable"' in resp.text
    assert 'data-testid="edge-prediction"' in resp.text  # the edge's own prediction is still there


@pytest.mark.integration
def test_users_command_and_password_rules(tmp_path):
    run_iomt("edge", "users", "add", "bob", "--data-dir", str(tmp_path), "--password-stdin", input="long enough pw\n")
    assert run_iomt("edge", "users", "list", "--data-dir", str(tmp_path)).stdout.split() == ["bob"]
    users = json.loads((tmp_path / "web" / "users.json").read_text())["users"]
    assert users["bob"]["hash"].startswith("$argon2id$") and "long enough" not in json.dumps(users)
    assert (tmp_path / "web" / "users.json").stat().st_mode & 0o077 == 0
    with pytest.raises(AccountError):
        Accounts(tmp_path).add("carol", "short")
    run_iomt("edge", "users", "remove", "bob", "--data-dir", str(tmp_path))
    assert not Accounts(tmp_path).verify("bob", "long enough pw")


def test_plain_http_off_loopback_is_refused(tmp_path):
    with pytest.raises(ValueError, match="plain HTTP"):
        WebSettings(data_dir=tmp_path, host="0.0.0.0")


def test_single_sign_on_header_only_from_the_trusted_gateway(edge):
    edge_dir, ids = edge
    # FastAPI's test client connects from the address "testclient"
    gateway = _client(edge_dir, behind_proxy=True, remote_user_header="X-Remote-User", trusted_proxies=["testclient"])
    resp = gateway.get("/patients", headers={"X-Remote-User": "alice"}, follow_redirects=False)
    assert resp.status_code == 200 and 'data-testid="user">alice<' in resp.text
    assert "secure" in resp.headers["set-cookie"].lower()  # behind the TLS gateway: Secure cookies
    unknown = gateway.get("/patients", headers={"X-Remote-User": "mallory"}, follow_redirects=False)
    assert unknown.status_code == 303  # no account here: not signed in
    elsewhere = _client(edge_dir, behind_proxy=True, remote_user_header="X-Remote-User", trusted_proxies=["10.0.0.2"])
    assert elsewhere.get("/patients", headers={"X-Remote-User": "alice"}, follow_redirects=False).status_code == 303


def test_an_answer_that_fails_its_checks_is_refused_with_a_clear_message():
    from cloud_aggregator.inference.errors import InferenceError
    from edge_server.web import CloudError
    from iomt.infer import check_result

    good = {"probabilities": [{"normal": 0.2, "cardiac": 0.3, "respiratory": 0.5}],
            "modality_weights": [{"image": 0.25, "ehr": 0.25, "signals": 0.25, "text": 0.25}]}
    check_result(good)
    for bad in ({**good, "probabilities": [{"normal": 0.9, "cardiac": 0.9, "respiratory": 0.1}]},
                {**good, "modality_weights": [{"image": 2.0, "ehr": 0.0, "signals": 0.0, "text": 0.0}]},
                {**good, "probabilities": [{"normal": float("nan"), "cardiac": 0.5, "respiratory": 0.5}]}):
        with pytest.raises(InferenceError) as err:
            check_result(bad)
        msg = CloudError(err.value.reason, err.value.detail)
        assert msg.kind == "checks" and msg.for_clinician().startswith("The cloud's answer failed its checks")
    assert CloudError("inconsistent_parties", "x").kind == "checks"
    assert CloudError("no_model", "x").for_clinician().startswith("The cloud refused the model version")
    assert CloudError("party_unreachable", "x").for_clinician().startswith("The cloud is unreachable")
