"""Builders for secure-aggregation tests: credentials, loopback TLS, and a real coordinator
plus n real `iomt cloud party` processes."""
from __future__ import annotations

import json
import os
import signal
import ssl
import time
from pathlib import Path

import httpx
import numpy as np

from edge_server.federated import FederatedClient
from protocols.auth import Signer, make_credentials, make_tls
from iomt.supervisor import free_port, spawn_iomt, stop, wait_port


def toy_state(seed: int, shape=(30, 20)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layer.weight": rng.normal(0, 1.0, shape).astype(np.float32),
            "layer.bias": rng.normal(0, 1.0, shape[1]).astype(np.float32)}


class Cluster:
    """Coordinator + ``parties`` party processes over TLS on loopback, in ``root``."""

    def __init__(self, root: Path, parties: int, hospitals: list[str], rounds: int = 1,
                 round_timeout: float = 60.0, spec_state: dict | None = None, model: dict | None = None,
                 strategy: str = "fedavg", min_hospitals: int | None = None, mpc: bool = False,
                 coord_extra: list[str] | None = None) -> None:
        self.root, self.n, self.hospitals = root, parties, hospitals
        #: with ``mpc`` the parties form a CrypTen group (plus a real triples provider process)
        self.mpc_master = f"127.0.0.1:{free_port()}" if mpc else None
        self.registry = make_credentials(root / "creds", hospitals, parties)
        self.tls = make_tls(root / "tls")
        state = spec_state if spec_state is not None else toy_state(0)
        model = model or {"arch": "toy", "config": {"hidden": 20}, "init_seed": 7}
        model = {**model, "spec": [[k, list(v.shape)] for k, v in state.items()]}
        (root / "model.json").write_text(json.dumps(model))
        self.party_ports = [free_port() for _ in range(parties)]
        self.coord_port = free_port()
        self.coord_url = f"https://127.0.0.1:{self.coord_port}"
        self.party_urls = [f"https://127.0.0.1:{p}" for p in self.party_ports]
        self.procs: dict[str, object] = {}
        self.coord_args = ["cloud", "coordinator", "--data-dir", str(root / "coord"),
                           "--listen", f"127.0.0.1:{self.coord_port}", "--registry", str(self.registry),
                           "--key-file", str(root / "creds/keys/coordinator.json"),
                           "--model", str(root / "model.json"), "--rounds", str(rounds),
                           "--round-timeout", str(round_timeout), "--strategy", strategy,
                           "--min-hospitals", str(min_hospitals or len(hospitals)),
                           *self._tls_args(), *(coord_extra or [])]
        for u in self.party_urls:
            self.coord_args += ["--party", u]

    def _tls_args(self) -> list[str]:
        return ["--tls-cert", str(self.tls["cert"]), "--tls-key", str(self.tls["key"]),
                "--tls-ca", str(self.tls["ca"])]

    def party_dir(self, i: int) -> Path:
        return self.root / f"party{i}"

    def start_party(self, i: int, wait: bool = True) -> None:
        args = ["-v", "cloud", "party", "--index", str(i), "--parties", str(self.n),
                "--data-dir", str(self.party_dir(i)), "--listen", f"127.0.0.1:{self.party_ports[i]}",
                "--registry", str(self.registry), "--key-file", str(self.root / f"creds/keys/party-{i}.json"),
                "--coordinator", self.coord_url, *self._tls_args()]
        if self.mpc_master:
            args += ["--mpc-master", self.mpc_master]
        self.procs[f"party{i}"] = spawn_iomt(*args, log=self.root / f"party{i}.log")
        if wait:
            wait_port(self.party_ports[i])

    def kill_party(self, i: int) -> None:
        stop(self.procs.pop(f"party{i}"), sig=signal.SIGKILL)

    def pause_party(self, i: int) -> None:
        """SIGSTOP party ``i``: requests to it hang (until :meth:`kill_party` SIGKILLs it mid-request)."""
        os.killpg(self.procs[f"party{i}"].pid, signal.SIGSTOP)

    def kill_coordinator(self) -> None:
        stop(self.procs.pop("coord"), sig=signal.SIGKILL)

    def start_coordinator(self, wait: bool = True) -> None:
        self.procs["coord"] = spawn_iomt("-v", *self.coord_args, log=self.root / "coord.log")
        if wait:
            wait_port(self.coord_port, timeout=60)

    def start(self) -> "Cluster":
        if self.mpc_master:
            self.procs["ttp"] = spawn_iomt("cloud", "triples", "--parties", str(self.n), "--mpc-master",
                                           self.mpc_master, log=self.root / "ttp.log")
        for i in range(self.n):  # start everything at once, then wait: imports dominate start-up
            self.start_party(i, wait=False)
        self.start_coordinator(wait=False)
        for port in [*self.party_ports, self.coord_port]:
            wait_port(port, timeout=60)
        if self.mpc_master:
            self.wait_mpc()
        return self

    def wait_mpc(self, timeout: float = 150.0) -> None:
        """Wait until every party's CrypTen worker has joined the group."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                verify = ssl.create_default_context(cafile=str(self.tls["ca"]))
                if all(httpx.get(f"{u}/inference/v1/status", verify=verify, timeout=5).json()["ready"]
                       for u in self.party_urls):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"MPC group not ready; see logs in {self.root}")

    def stop(self) -> None:
        for proc in self.procs.values():
            stop(proc)
        self.procs.clear()

    def signer(self, principal: str) -> Signer:
        return Signer.from_file(self.root / "creds" / "keys" / f"{principal}.json")

    def client(self, hospital: str) -> FederatedClient:
        return FederatedClient(self.signer(hospital), self.coord_url, ca=self.tls["ca"])

    def clients(self) -> dict[str, FederatedClient]:
        """A registered client per hospital (registering opens round 1 once all are in)."""
        out = {h: self.client(h) for h in self.hospitals}
        for c in out.values():
            c.register()
        return out

    def wait_round(self, client: FederatedClient, rnd: int, states=("done", "failed"), timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = client.status()
            cur = st.current
            if cur is not None and cur.config.round == rnd and cur.state in states:
                return cur
            if cur is not None and cur.config.round > rnd and "open" not in states:
                return client.round_status(rnd)
            time.sleep(0.2)
        raise TimeoutError(f"round {rnd} did not reach {states}; see logs in {self.root}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))
