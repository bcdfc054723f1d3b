"""`iomt demo` end to end at a small size: every role a real process, and a report that
says what happened. Checks the content, not the speed."""
from __future__ import annotations

import json
import subprocess

import pytest

from iomt.supervisor import REPO_ROOT, child_env, iomt_argv


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["attention", "quadratic"])
def test_small_demo_runs_every_role_and_reports(tmp_path, fusion):
    out = tmp_path / "demo"
    proc = subprocess.run(iomt_argv("demo", "--out", str(out), "--hospitals", "2", "--patients", "10",
                                   "--duration", "16", "--rounds", "1", "--epochs", "1", "--fusion", fusion),
                          env=child_env(one_thread=True), cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for h, ing in report["ingest"].items():  # nothing lost between devices and edge
        assert ing["stored"]["total"] == sum(ing["published"].values()) > 0, h
    assert set(report["federation"]) == set(report["hospitals"])
    shas = {res["global"]["sha256"] for res in report["federation"].values()}
    assert len(shas) == 1  # every hospital reconstructed the same global model
    for res in report["federation"].values():
        assert res["rounds"][0]["uploaded_bytes"] > 0 and "epsilon" in res["rounds"][0]["train_metrics"]
    inf = report["inference"]
    assert inf["same_class"] and inf["max_prob_diff"] < 1e-2
    assert f"{fusion} fusion" in (out / "report.md").read_text()
    assert (out / "report.md").read_text().startswith("# iomt demo report")
    assert (out / "rounds.png").stat().st_size > 0 and (out / "inference.png").stat().st_size > 0
    # every process was stopped: no child of the demo is left holding its output folder
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == []


@pytest.mark.integration
def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run(iomt_argv("demo", "--out", str(tmp_path)), env=child_env(one_thread=True), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not made by `iomt demo`" in proc.stderr + proc.stdout
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.integration
def test_demo_serve_leaves_both_pages_up_until_ctrl_c(tmp_path):
    import re
    import signal
    import ssl
    import threading

    import httpx

    out = tmp_path / "demo"
    proc = subprocess.Popen(iomt_argv("demo", "--out", str(out), "--hospitals", "2", "--patients", "10",
                                     "--duration", "16", "--rounds", "1", "--epochs", "1", "--serve"),
                            env=child_env(one_thread=True), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True,
                            # as from a terminal: a suite run in the background (nohup, CI runners)
                            # passes SIGINT down ignored, and Python keeps it ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in proc.stdout:  # until both pages are printed (or the demo exits)
            lines.append(line)
            if line.strip().startswith("(the coordinator's TLS"):  # the last line printed
                break
        text = "".join(lines)
        # keep draining: the demo and its services go on logging (a line per request), and a
        # full pipe would block them, shutdown included
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        clinician = re.search(r"clinician's page \(\S+\): (http://\S+)/\s+user: demo\s+password: (\S+)", text)
        operator = re.search(r"operator's page: (https://\S+)\s+token \(sign in within 10 min\):\s+(\S+)", text)
        assert clinician and operator, text[-3000:]
        assert (out / "report.md").exists()  # the report came first
        with httpx.Client(base_url=clinician.group(1), follow_redirects=True) as web:
            csrf = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text).group(1)
            resp = web.post("/login", data={"username": "demo", "password": clinician.group(2), "csrf": csrf})
            assert resp.status_code == 200 and "Patients" in resp.text and "10 patients" in resp.text
        tls = out / "cloud" / "tls"  # mutual TLS: a script with the coordinator's token uses its certificate
        verify = ssl.create_default_context(cafile=str(tls / "ca" / "ca.pem"))
        verify.load_cert_chain(tls / "hosts" / "coordinator" / "tls.pem", tls / "hosts" / "coordinator" / "tls.key")
        state = httpx.get(f"{operator.group(1)}/state.json", verify=verify,
                          headers={"Authorization": f"Bearer {operator.group(2)}"}).json()
        assert state["summary"]["rounds_done"] == 1 and all(p["mpc"] == "ready" for p in state["parties"])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:  # SIGTERM: the demo stops every child before it exits
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == []
