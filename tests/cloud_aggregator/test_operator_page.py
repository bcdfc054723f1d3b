"""The operator's page in a real browser (Debian's chromium via Playwright) against a real
coordinator and two party processes over TLS on loopback, while rounds run."""
from __future__ import annotations

import httpx
import pytest

from protocols.auth import revoke
from protocols.pki import issue_local
from iomt.local_cloud import LocalCloud, toy_state
from tests.utils.browser import DESKTOP, TABLET, browser, check_accessible, check_fits, chromium_path, screenshot
from iomt.supervisor import run_iomt

pytestmark = pytest.mark.integration


def test_operator_page_shows_rounds_closing_live(tmp_path):
    chromium_path()
    cluster = LocalCloud.secagg(tmp_path, parties=2, clients=["h1", "h2"], rounds=2, round_timeout=10.0).start()
    try:
        token = run_iomt("cloud", "operator-token", "--key-file",
                         str(tmp_path / "creds" / "keys" / "coordinator.json")).stdout.strip()
        url = f"{cluster.coord_url}/operator"
        # mutual TLS: a script with a bearer token presents its principal's certificate, the
        # operator's browser a certificate of its own (role operator) from the federation's CA
        verify = cluster.client_tls("coordinator")
        operator = issue_local(tmp_path / "tls", [("operator", "operator")])[1]["operator"]
        # the same authentication as the API: no token, or a hospital's token, is refused
        assert httpx.get(f"{url}/state.json", verify=verify).status_code == 401
        hospital_token = cluster.signer("h1").token("coordinator")
        assert httpx.get(f"{url}/state.json", verify=cluster.client_tls("h1"),
                         headers={"Authorization": f"Bearer {hospital_token}"}).status_code == 401
        with browser() as b:
            page = b.new_context(ignore_https_errors=True, viewport=DESKTOP, client_certificates=[
                {"origin": cluster.coord_url, "certPath": operator.tls_cert, "keyPath": operator.tls_key}]).new_page()
            page.goto(url)
            assert page.url.endswith("/operator/login")
            page.get_by_label("Operator token").fill(hospital_token)
            page.get_by_role("button", name="Sign in").click()
            assert "role 'hospital' may not do this" in page.locator("#login-error").inner_text()
            page.get_by_label("Operator token").fill(token)
            page.get_by_role("button", name="Sign in").click()
            assert page.get_by_test_id("who").inner_text() == "coordinator"
            assert "No round yet" in page.inner_text("#live")
            page.evaluate("() => { window.__sameDocument = true; }")
            # hospitals register: round 1 opens; both upload: it closes while the page watches
            clients = cluster.federated_clients()
            page.locator('tr[data-round="1"][data-state="open"]').wait_for(timeout=30_000)
            for i, (h, client) in enumerate(clients.items()):
                st = cluster.wait_round(client, 1, states=("open",))
                client.upload(st.config, toy_state(i + 1), 10 * (i + 1))
            page.locator('tr[data-round="1"][data-state="done"]').wait_for(timeout=60_000)
            # h1 reports its ledger as `iomt edge federate` does after each round
            clients["h1"].report_privacy(1, {"epsilon": 2.5, "delta": 1e-5, "dp": "sgd", "epsilon_budget": 8.0})
            # round 2: only h1 uploads; at the deadline h2 is excluded, and the page says why
            st = cluster.wait_round(clients["h1"], 2, states=("open",))
            clients["h1"].upload(st.config, toy_state(5), 10)
            row2 = page.locator('tr[data-round="2"][data-state="done"]')
            row2.wait_for(timeout=60_000)
            assert page.evaluate("() => window.__sameDocument") is True  # updated without a reload
            assert "excluded: h2" in row2.inner_text()
            assert page.get_by_test_id("rounds-done").inner_text() == "2"
            versions = page.get_by_test_id("versions").inner_text()
            status = httpx.get(f"{cluster.coord_url}/rounds/1", verify=cluster.client_tls("h1"),
                               headers=cluster.signer("h1").headers("coordinator")).json()
            assert all(h[:16] in versions for h in status["share_sha256"])
            hospitals = page.get_by_test_id("hospitals")
            assert "2 (1, 2)" in hospitals.get_by_role("row", name="h1").inner_text()
            assert "1 (1)" in hospitals.get_by_role("row", name="h2").inner_text()
            assert "—" not in hospitals.get_by_role("row", name="h1").inner_text()  # last seen
            privacy = page.get_by_test_id("privacy")
            assert "2.5 at δ = 1e-05, patient level" in privacy.get_by_role("row", name="h1").inner_text()
            assert "not reported" in privacy.get_by_role("row", name="h2").inner_text()
            assert page.get_by_test_id("parties").inner_text().count("\tup\t") == 2
            check_accessible(page)
            check_fits(page, DESKTOP)
            screenshot(page, "operator")
            check_fits(page, TABLET)
        state = httpx.get(f"{url}/state.json", verify=verify, headers={"Authorization": f"Bearer {token}"}).json()
        assert [r["state"] for r in state["rounds"]] == ["done", "done"]
        assert state["rounds"][0]["participants"] == ["h1"] and state["parties"][0]["up"]
        # a session outlives its short token, but not the revocation of the key that signed in
        with httpx.Client(verify=verify) as session:
            fresh = cluster.signer("coordinator").token("coordinator")
            assert session.post(f"{url}/login", data={"token": fresh}).status_code == 303
            assert session.get(url).status_code == 200
            revoke(cluster.registry, "coordinator")
            assert session.get(url).headers["location"].endswith("/operator/login")
    finally:
        cluster.stop()
