"""`iomt edge federate` rides out an unreachable coordinator: it retries with backoff (a WARNING
per retry, with the reason) and takes part once the coordinator starts; past `--retry-for` it
exits 4 with one clear line and no traceback."""
from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_server.federation.client import FederatedClient, Unreachable
from protocols.auth import Signer, make_credentials
from protocols.retry import Backoff
from iomt.supervisor import run_iomt, spawn_iomt
from tests.utils.records import write_store

QUICK = Backoff(first_s=0.01, max_s=0.05, give_up_after_s=5.0, rng=random.Random(0))


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503, then 502, then the federation's status (a real HTTP server, like a proxy
    in front of a coordinator that is restarting)."""

    answers: list[int] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        code = self.answers.pop(0) if self.answers else 200
        body = b"down for now" if code != 200 else json.dumps(
            {"current": None, "latest_version": None, "rounds_done": 0, "rounds_planned": 1, "finished": False,
             "parties": ["http://p0", "http://p1"]}).encode()
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_backoff_grows_with_full_jitter_and_stays_capped():
    policy = Backoff(first_s=1.0, max_s=8.0, rng=random.Random(1))
    delays = [[policy.delay(a) for _ in range(200)] for a in range(6)]
    assert all(0 <= d <= min(8.0, 2 ** a) for a, row in enumerate(delays) for d in row)
    assert max(delays[0]) <= 1.0 < max(delays[2]) and max(delays[5]) > 6.0  # grows, then capped at 8
    assert len({round(d, 6) for d in delays[3]}) > 150  # jittered, not one fixed pause


def test_register_retries_502_and_503_then_gives_up_on_a_refused_port(tmp_path, caplog):
    make_credentials(tmp_path / "creds", ["h1"], 2)
    signer = Signer.from_file(tmp_path / "creds" / "keys" / "h1.json")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    _Flaky.answers = [503, 502]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = FederatedClient(signer, f"http://127.0.0.1:{server.server_port}", retry=QUICK)
        with caplog.at_level("WARNING", logger="protocols.retry"):
            status = client.register()
        assert status.rounds_planned == 1 and client.party_urls == ["http://p0", "http://p1"]
        reasons = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(reasons) == 2 and "HTTP 503" in reasons[0] and "HTTP 502" in reasons[1]
    finally:
        server.shutdown()
        server.server_close()
    # the port is closed now: refused every time, so the client gives up within the policy's time
    client = FederatedClient(signer, f"http://127.0.0.1:{server.server_port}",
                             retry=Backoff(first_s=0.01, max_s=0.05, give_up_after_s=0.3))
    with pytest.raises(Unreachable, match="ConnectError"):
        client.status()


@pytest.mark.integration
def test_federate_started_before_the_coordinator_completes(tmp_path: Path):
    from edge_server.training import ModelConfig, initial_state
    from iomt.local_cloud import LocalCloud
    cfg = ModelConfig(dim=8, ehr_hidden=8, lstm_hidden=8, lstm_layers=1, text_layers=1, cnn_channels=(2, 4, 4),
                      text_vocab=64, text_len=12, signal_pool=25)
    model = {"arch": "multimodal", "config": cfg.model_dump(mode="json"), "init_seed": 3}
    cluster = LocalCloud.secagg(tmp_path, 2, ["h1"], rounds=1, round_timeout=300.0, state=initial_state(cfg, 3),
                                model=model)
    try:
        edge = tmp_path / "edge"
        write_store(edge, 12, seed=1, hospital="h1")
        log = tmp_path / "federate.log"
        # Execute: federate first (parties and coordinator down: refused), the cloud later
        proc = spawn_iomt("edge", "federate", "--data-dir", str(edge), "--key-file", str(cluster.key_file("h1")),
                          "--coordinator", cluster.coord_url, *cluster.client_tls_args("h1"), "--dp", "off",
                          "--retry-for", "300", log=log, env={"IOMT_FEDERATE_RETRY_MAX": "2"})
        _wait_for(lambda: log.read_text().count("retry ") >= 2 or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        cluster.start(wait_mpc=False)
        code = proc.wait(600)
        text = log.read_text()
        # Assert: retried (WARNING, with the reason), then took part in the round and finished
        assert code == 0, text
        assert "WARNING" in text and "ConnectError" in text and "register" in text
        assert "h1: 1 rounds" in text and "Traceback" not in text
    finally:
        cluster.stop()


@pytest.mark.integration
def test_federate_gives_up_on_an_unknown_host_with_exit_4_and_no_traceback(tmp_path: Path):
    make_credentials(tmp_path / "creds", ["h1"], 2)
    edge = tmp_path / "edge"
    write_store(edge, 6, seed=1, hospital="h1")
    (tmp_path / "federate.toml").write_text("retry_first = 0.2\nretry_max = 0.5\n")  # the settings keys
    done = run_iomt("edge", "federate", "--config", str(tmp_path / "federate.toml"), "--data-dir", str(edge),
                    "--key-file", str(tmp_path / "creds/keys/h1.json"),
                    "--coordinator", "https://coordinator.no-such-host.invalid:8790", "--dp", "off",
                    "--retry-for", "1.5", check=False)
    assert done.returncode == 4, done.stderr
    assert "retry 1" in done.stderr and "WARNING" in done.stderr
    assert "unreachable" in done.stderr and "exit 4" in done.stderr and "Traceback" not in done.stderr


def _wait_for(cond, timeout: float = 120.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.2)
