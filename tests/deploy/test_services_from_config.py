"""A party and a coordinator started with `--config FILE` alone (no other flag) serve /health
over mutual TLS, each with its own key and certificate named in its file; `iomt probe` (the
containers' health checks and Kubernetes probes) passes with that same file, presenting the
service's own certificate, where a client without one is refused in the handshake."""
from __future__ import annotations

import json

import httpx
import pytest

from iomt.supervisor import Supervisor, free_port, iomt_argv, run_iomt, wait_port
from protocols.auth import make_credentials
from protocols.pki import issue_local
from protocols.tls_client import ClientTls


def _tls(host) -> str:
    return (f'tls_cert = "{host.tls_cert}"\ntls_key = "{host.tls_key}"\ntls_ca = "{host.ca}"\n'
            f'tls_crl = "{host.crl}"\n')


@pytest.mark.integration
def test_party_and_coordinator_from_config_files(tmp_path):
    registry = make_credentials(tmp_path / "creds", ["h1"], 2)
    keys = tmp_path / "creds" / "keys"
    (tmp_path / "model.json").write_text(json.dumps(
        {"arch": "toy", "config": {}, "init_seed": 1, "spec": [["w", [4, 3]], ["b", [3]]]}))
    _, hosts = issue_local(tmp_path / "tls", [("party-0", "party"), ("coordinator", "coordinator")])
    party_port, coord_port = free_port(), free_port()
    party_url, coord_url = f"https://127.0.0.1:{party_port}", f"https://127.0.0.1:{coord_port}"
    (tmp_path / "party.toml").write_text(f"""
index = 0
parties = 2
data_dir = "{tmp_path / 'party-0'}"
port = {party_port}
registry = "{registry}"
key_file = "{keys / 'party-0.json'}"
coordinator_url = "{coord_url}"
{_tls(hosts["party-0"])}""")
    (tmp_path / "coordinator.toml").write_text(f"""
data_dir = "{tmp_path / 'coordinator'}"
port = {coord_port}
registry = "{registry}"
key_file = "{keys / 'coordinator.json'}"
party_urls = ["{party_url}", "http://127.0.0.1:1"]
model_file = "{tmp_path / 'model.json'}"
round_timeout = 3600
{_tls(hosts["coordinator"])}""")
    with Supervisor(tmp_path / "logs", one_thread=True) as sup:
        party = sup.start("party", iomt_argv("cloud", "party", "--config", str(tmp_path / "party.toml")))
        coord = sup.start("coordinator", iomt_argv("cloud", "coordinator", "--config",
                                                   str(tmp_path / "coordinator.toml")))
        wait_port(party_port, proc=party.proc, name="party")
        wait_port(coord_port, proc=coord.proc, name="coordinator")
        c = hosts["coordinator"]
        verify = ClientTls(c.ca, c.tls_cert, c.tls_key).context()
        assert httpx.get(f"{party_url}/health", verify=verify).json()["party_index"] == 0
        assert httpx.get(f"{coord_url}/health", verify=verify).status_code == 200
        # the probes: each service's own file, its own certificate; none at all fails the handshake
        for url, toml in ((party_url, "party.toml"), (coord_url, "coordinator.toml")):
            for path in ("/health", "/ready"):
                done = run_iomt("probe", url + path, "--config", str(tmp_path / toml), check=False)
                assert done.returncode == 0, done.stderr
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{url}/health", verify=ClientTls(c.ca).context())
        # pinned to its own principal: the coordinator's file does not pass as party 0's probe
        done = run_iomt("probe", f"{party_url}/health", "--config", str(tmp_path / "coordinator.toml"), check=False)
        assert done.returncode == 1 and "as coordinator" in done.stderr, done.stderr


def test_probe_refuses_a_file_without_tls_files(tmp_path):
    (tmp_path / "party.toml").write_text('index = 0\nport = 8800\ntls_cert = "/nonexistent/tls.pem"\n')
    done = run_iomt("probe", "https://127.0.0.1:1/health", "--config", str(tmp_path / "party.toml"), check=False)
    assert done.returncode == 2 and "names no tls_key, tls_ca" in done.stderr, done.stderr
