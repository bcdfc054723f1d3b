"""The clinician's page in a real browser (Debian's chromium via Playwright) against real
services on loopback: `iomt edge web`, two CrypTen parties and the triples provider."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from cloud_aggregator.inference.publish import publish_shared_model
from edge_server.training import save_model
from edge_server.web import Accounts, WebSettings
from iomt.local_cloud import LocalCloud
from protocols.model import ModelConfig, build_model, state_to_numpy
from tests.utils.browser import DESKTOP, TABLET, browser, check_accessible, check_fits, chromium_path, screenshot
from tests.utils.clinic import write_full_store
from iomt.supervisor import free_port, run_iomt, spawn_iomt, stop, wait_port

pytestmark = pytest.mark.integration
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """An edge store with a global model (version 1), the parties serving it, and the page."""
    chromium_path()  # skip before starting anything when there is no browser
    root = tmp_path_factory.mktemp("clinic")
    edge = root / "edge"
    ids = write_full_store(edge, 12, seed=3)
    torch.manual_seed(5)
    cfg = ModelConfig(dim=16)
    state = state_to_numpy(build_model(cfg).eval())
    save_model(edge / "models", cfg, state, name="global", info={"version": 1})
    run_iomt("edge", "users", "add", "alice", "--data-dir", str(edge), "--password-stdin", input=PASSWORD + "\n")

    cloud = LocalCloud(root / "cloud", 2, ["h0"], mpc=True, log_dir=root)
    publish_shared_model(cloud.party_dirs, [state], [1], "multimodal", json.loads(cfg.to_json()))
    port = free_port()
    key = root / "cloud" / "creds" / "keys" / "h0.json"
    web = spawn_iomt("edge", "web", "--data-dir", str(edge), "--listen", f"127.0.0.1:{port}",
                     "--parties", ",".join(cloud.party_urls), "--key-file", str(key), log=root / "web.log")
    try:
        cloud.start()
        wait_port(port, timeout=60)
        yield {"url": f"http://127.0.0.1:{port}", "edge": edge, "ids": ids, "cloud": cloud, "key": key}
    finally:
        stop(web)
        cloud.stop()


def _sign_in(page, url: str, password: str) -> None:
    page.goto(f"{url}/login")
    page.get_by_label("User name").fill("alice")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def _probs(page, testid: str) -> dict[str, float]:
    cells = page.locator(f"[data-testid={testid}] td[data-class]")
    return {cells.nth(i).get_attribute("data-class"): float(cells.nth(i).get_attribute("data-value"))
            for i in range(cells.count())}


def test_wrong_password_is_refused(services):
    with browser() as b:
        page = b.new_page(viewport=DESKTOP)
        _sign_in(page, services["url"], "not the password")
        assert page.locator("#login-error").inner_text() == "Wrong user name or password."
        assert "/login" in page.url
        assert page.context.cookies() == [] or all(c["name"] != "iomt_session" for c in page.context.cookies())
        page.goto(f"{services['url']}/patients")
        assert "/login" in page.url  # still not signed in
        check_accessible(page)


def test_sign_in_open_patient_and_ask_the_cloud(services):
    url, ids = services["url"], services["ids"]
    patient = ids[7]
    with browser() as b:
        page = b.new_page(viewport=DESKTOP)
        _sign_in(page, url, PASSWORD)
        assert page.get_by_test_id("user").inner_text() == "alice"
        page.get_by_label("Find a patient by id").fill(patient[-4:])
        page.keyboard.press("Enter")
        page.get_by_role("link", name=patient).click()
        assert page.get_by_test_id("patient-id").inner_text() == patient
        assert page.locator(".chips .present").count() == 4
        assert page.locator("figure.plot svg polyline").count() == 6
        # the image loads after the page: wait for it, then check its size
        page.wait_for_function("() => { const i = document.querySelector('img.study'); return i && i.complete; }")
        assert page.locator("img.study").evaluate("img => img.complete && img.naturalWidth") == 96
        assert page.get_by_role("row", name=re.compile("Heart rate")).count() == 1
        check_accessible(page)
        # keyboard only: Tab to the button and press Enter
        page.get_by_role("button", name="Ask the cloud").focus()
        page.keyboard.press("Enter")
        page.get_by_test_id("cloud-prediction").wait_for(timeout=120_000)
        shown = _probs(page, "cloud-probs")
        edge = _probs(page, "edge-probs")
        assert page.get_by_test_id("cloud-version").inner_text() == "1"
        assert re.match(r"\d+\.\d\d s at the edge", page.get_by_test_id("cloud-time").inner_text())
        check_accessible(page)
        check_fits(page, DESKTOP)
        screenshot(page, "clinician")
        check_fits(page, TABLET)
    # the same probabilities as the API (`iomt infer --json`), and as the edge's plaintext model
    api = json.loads(run_iomt("infer", "--patient", patient, "--data-dir", str(services["edge"]), "--parties",
                              ",".join(services["cloud"].party_urls), "--key-file", str(services["key"]),
                              "--json").stdout)
    assert set(shown) == set(api["probabilities"][0])
    for k, v in api["probabilities"][0].items():
        assert shown[k] == pytest.approx(v, abs=2e-3)
        assert edge[k] == pytest.approx(v, abs=1e-2)
    audit = [json.loads(x) for x in (services["edge"] / "audit" / "web.jsonl").read_text().splitlines()]
    asked = [e for e in audit if e["path"] == f"/patients/{patient}/ask"]
    assert asked and asked[-1]["user"] == "alice" and asked[-1]["cloud"] == "ok"


def test_refused_model_version_is_a_clear_message(services):
    """The parties hold version 1 only: asking for version 9 is refused, the page says so."""
    from iomt.edge_web import build_app

    Accounts(services["edge"])  # the account from the fixture
    settings = WebSettings(data_dir=services["edge"], parties=services["cloud"].party_urls, key_file=services["key"],
                           model_version=9)
    client = TestClient(build_app(settings), base_url="http://127.0.0.1")
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": token})
    pid = services["ids"][1]
    view = client.get(f"/patients/{pid}").text
    token = re.search(r'name="csrf" value="([^"]+)"', view).group(1)
    resp = client.post(f"/patients/{pid}/ask", data={"csrf": token})
    assert 'data-kind="version"' in resp.text and "refused the model version" in resp.text
    assert np.isfinite(float(re.search(r'data-testid="edge-probs".*?data-value="([\d.]+)"', resp.text, re.S).group(1)))
