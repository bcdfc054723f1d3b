"""A whole cloud on loopback: n parties, optionally the coordinator and (for encrypted inference)
the CrypTen triples provider, each a real `iomt cloud` process started through
:class:`iomt.supervisor.Supervisor`, with credentials for the named clients and, with ``tls``,
mutual TLS: every principal its own key and certificate from one local CA (``tls/``), as
`iomt keys init` and `iomt ca sign` make them on separate hosts. Without ``tls`` the services
are started with ``--insecure-http``.

Used by `iomt demo`, the encrypted-inference experiments (:func:`serving`), the tests and the
benches; parties and the coordinator can be killed, paused and restarted to test recovery.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from iomt.supervisor import Child, ChildFailed, Supervisor, free_port, iomt_argv, wait_port
from protocols.errors import IomtError

READY_TIMEOUT_S = 150.0
PORT_TIMEOUT_S = 120.0
ROUND_POLL_S = 0.2


#: The model the secure-aggregation presets federate (its ``spec`` comes from the state).
TOY_MODEL = {"arch": "toy", "config": {"hidden": 20}, "init_seed": 7}


class CloudNotReady(ChildFailed, IomtError):
    """The MPC parties did not all report ready in time."""


def toy_state(seed: int, shape=(30, 20)) -> dict[str, np.ndarray]:
    """A small random two-tensor model state (for secure-aggregation runs without a real network)."""
    rng = np.random.default_rng(seed)
    return {"layer.weight": rng.normal(0, 1.0, shape).astype(np.float32),
            "layer.bias": rng.normal(0, 1.0, shape[1]).astype(np.float32)}


class LocalCloud:
    """``parties`` parties (+ coordinator) (+ triples provider) as `iomt cloud` processes on 127.0.0.1.

    Parameters
    ----------
    root
        Credentials (``creds/``), TLS material (``tls/``), ``model.json`` and the data folders
        (``party-<i>/``, ``coordinator/``) go here.
    parties
        How many secret-sharing parties.
    clients
        Principals (hospitals, clinicians) to write credentials for.
    model
        With a model, a coordinator is started: a dict (``spec`` is filled in from ``state``,
        default :func:`toy_state`) is written to ``root/model.json``; a path is used as is.
    state
        The model state whose shapes make the ``spec`` of a dict ``model``.
    mpc
        Parties form a CrypTen group, with a triples provider process.
    tls
        Mutual TLS: every service and client has its own key and certificate from a loopback CA
        (``tls/ca``; each principal's files in ``tls/hosts/<id>``, see :meth:`client_tls`);
        ``self.tls["ca"]`` is the CA certificate. Otherwise plain HTTP (``--insecure-http``).
    rounds, round_timeout, strategy, min_hospitals, coord_args
        The coordinator's settings (``min_hospitals`` defaults to all ``clients``).
    env
        Extra environment for every process (``IOMT_PARTY_*``, ``IOMT_COORD_*`` settings).
    verbose
        Start every service with ``-v``.
    metrics
        Every party and the coordinator serve Prometheus metrics on a loopback port of their own
        (``party_metrics_ports``, ``coord_metrics_port``; read with :meth:`scrape`).
    sup
        Start the processes through this supervisor (default: one of our own, logging to
        ``log_dir`` or ``root``, one OpenMP thread per child).
    """

    def __init__(self, root: Path, parties: int = 2, clients: Sequence[str] = ("h1", "h2"), *,
                 model: dict | Path | None = None, state: dict | None = None, mpc: bool = False,
                 tls: bool = False, rounds: int = 1, round_timeout: float = 60.0, strategy: str = "fedavg",
                 min_hospitals: int | None = None, coord_args: Sequence[str] = (),
                 env: dict[str, str] | None = None, verbose: bool = False, sup: Supervisor | None = None,
                 log_dir: Path | None = None, metrics: bool = False) -> None:
        from protocols.auth import Signer, make_credentials
        from protocols.pki import issue_local

        self.root, self.n, self.clients = Path(root), parties, list(clients)
        self.env, self.verbose = dict(env or {}), verbose
        self.sup = sup or Supervisor(Path(log_dir or root), one_thread=True)
        self.registry = make_credentials(self.root / "creds", self.clients, parties)
        self.signers = {c: Signer.from_file(self.root / "creds" / "keys" / f"{c}.json") for c in self.clients}
        self.tls: dict[str, Path] | None = None
        self.tls_hosts: dict = {}
        if tls:
            principals = [(c, "hospital") for c in self.clients] + [(f"party-{i}", "party") for i in range(parties)]
            self.ca, self.tls_hosts = issue_local(self.root / "tls", [*principals, ("coordinator", "coordinator")])
            self.tls = {"ca": self.ca.cert_path, "crl": self.ca.crl_path}
        scheme = "https" if tls else "http"
        self.mpc_master = f"127.0.0.1:{free_port()}" if mpc else None
        self.party_ports = [free_port() for _ in range(parties)]
        self.party_urls = [f"{scheme}://127.0.0.1:{p}" for p in self.party_ports]
        self.party_dirs = [self.root / f"party-{i}" for i in range(parties)]
        self.party_metrics_ports = [free_port() for _ in range(parties)] if metrics else None
        self.coord_metrics_port = free_port() if metrics and model is not None else None
        self.procs: dict[str, subprocess.Popen] = {}
        self._children: dict[str, Child] = {}
        self.coord_port = self.coord_url = None
        if model is not None:
            if isinstance(model, dict):
                state = state if state is not None else toy_state(0)
                model = {**model, "spec": [[k, list(v.shape)] for k, v in state.items()]}
                (self.root / "model.json").write_text(json.dumps(model))
                model = self.root / "model.json"
            self.coord_port = free_port()
            self.coord_url = f"{scheme}://127.0.0.1:{self.coord_port}"
            self.coord_args = [
                "cloud", "coordinator", "--data-dir", str(self.root / "coordinator"),
                "--listen", f"127.0.0.1:{self.coord_port}", "--registry", str(self.registry),
                "--key-file", str(self.key_file("coordinator")), "--model", str(model), "--rounds", str(rounds),
                "--round-timeout", str(round_timeout), "--strategy", strategy,
                "--min-hospitals", str(min_hospitals or len(self.clients)), *self._tls_args("coordinator"),
                *coord_args]
            if self.coord_metrics_port:
                self.coord_args += ["--metrics-port", str(self.coord_metrics_port)]
            for url in self.party_urls:
                self.coord_args += ["--party", url]

    @classmethod
    def secagg(cls, root: Path, parties: int, clients: Sequence[str], model: dict | Path = TOY_MODEL,
               **kw) -> LocalCloud:
        """Coordinator and parties over TLS, verbose, federating ``model`` (default: a toy one)."""
        return cls(root, parties, clients, model=model, tls=True, verbose=True, **kw)

    @classmethod
    def api(cls, root: Path, env: dict[str, str] | None = None) -> LocalCloud:
        """Coordinator and two parties over plain HTTP for hospitals h1 and h2, a 4x3 toy model and
        an hour's round deadline: what the API boundary tests and fuzzers call."""
        return cls(root, 2, ["h1", "h2"], model={"arch": "toy", "config": {}, "init_seed": 1},
                   state={"w": np.zeros((4, 3)), "b": np.zeros(3)}, round_timeout=3600, env=env)

    def key_file(self, principal: str) -> Path:
        return self.root / "creds" / "keys" / f"{principal}.json"

    def _tls_args(self, principal: str) -> list[str]:
        """A service's TLS flags: its own certificate and key, the CA and CRL (or --insecure-http)."""
        if self.tls is None:
            return ["--insecure-http"]
        return ["--tls-cert", str(self.tls_hosts[principal].tls_cert), "--tls-key", str(self.tls_hosts[principal].tls_key),
                "--tls-ca", str(self.tls["ca"]), "--tls-crl", str(self.tls["crl"])]

    def client_tls_args(self, principal: str) -> list[str]:
        """`iomt edge federate`'s TLS flags for ``principal`` (empty without TLS)."""
        return [] if self.tls is None else self._tls_args(principal)

    def client_tls(self, principal: str = "coordinator"):
        """An httpx ``verify=`` for a client acting as ``principal``: the CA (and CRL) and
        ``principal``'s own certificate (True without TLS)."""
        from protocols.tls_client import ClientTls

        if self.tls is None:
            return True
        files = self.tls_hosts[principal]
        return ClientTls(self.tls["ca"], files.tls_cert, files.tls_key, self.tls["crl"]).context()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        argv = iomt_argv(*(["-v"] if self.verbose else []), *args)
        self._children[name] = self.sup.start(name, argv, env=self.env)
        self.procs[name] = self._children[name].proc
        return self.procs[name]

    def _wait(self, name: str, port: int) -> None:
        wait_port(port, timeout=PORT_TIMEOUT_S, proc=self.procs[name], name=name)

    def party_dir(self, i: int) -> Path:
        return self.party_dirs[i]

    def start_party(self, i: int, wait: bool = True) -> None:
        args = ["cloud", "party", "--index", str(i), "--parties", str(self.n), "--data-dir", str(self.party_dirs[i]),
                "--listen", f"127.0.0.1:{self.party_ports[i]}", "--registry", str(self.registry)]
        if self.coord_url:
            args += ["--key-file", str(self.key_file(f"party-{i}")), "--coordinator", self.coord_url]
        args += self._tls_args(f"party-{i}")
        if self.mpc_master:
            args += ["--mpc-master", self.mpc_master]
        if self.party_metrics_ports:
            args += ["--metrics-port", str(self.party_metrics_ports[i])]
        self._start(f"party-{i}", args)
        if wait:
            self._wait(f"party-{i}", self.party_ports[i])

    def start_coordinator(self, wait: bool = True) -> None:
        self._start("coordinator", self.coord_args)
        if wait:
            self._wait("coordinator", self.coord_port)

    def start(self, timeout: float = READY_TIMEOUT_S, wait_mpc: bool = True) -> LocalCloud:
        """Start every process at once (imports dominate start-up), then wait until all listen
        and, with MPC and ``wait_mpc``, until every party's CrypTen worker has joined the group."""
        if self.mpc_master:
            self._start("triples", ["cloud", "triples", "--parties", str(self.n), "--mpc-master", self.mpc_master])
        for i in range(self.n):
            self.start_party(i, wait=False)
        if self.coord_url:
            self.start_coordinator(wait=False)
        for i, port in enumerate(self.party_ports):
            self._wait(f"party-{i}", port)
        if self.coord_url:
            self._wait("coordinator", self.coord_port)
        if self.mpc_master and wait_mpc:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until every party's CrypTen worker has joined the group."""
        import httpx

        verify = self.client_tls("coordinator")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sup.check()
            try:
                if all(httpx.get(f"{u}/inference/v1/status", verify=verify, timeout=5).json()["ready"]
                       for u in self.party_urls):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise CloudNotReady(f"the MPC parties did not become ready within {timeout:.0f}s "
                            f"(logs in {self.sup.log_dir})")

    def _stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        del self.procs[name]
        self.sup.stop_child(self._children.pop(name), sig=sig)

    def stop_party(self, i: int, sig: int = signal.SIGTERM) -> None:
        self._stop(f"party-{i}", sig)

    def kill_party(self, i: int) -> None:
        self.stop_party(i, signal.SIGKILL)

    def pause_party(self, i: int) -> None:
        """SIGSTOP party ``i``: requests to it hang (until :meth:`kill_party` SIGKILLs it mid-request)."""
        os.killpg(self.procs[f"party-{i}"].pid, signal.SIGSTOP)

    def kill_coordinator(self) -> None:
        self._stop("coordinator", signal.SIGKILL)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self._stop(name)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())

    def log(self, name: str) -> str:
        return (self.sup.log_dir / f"{name}.log").read_text(errors="replace")

    def metrics(self, url: str, audience: str) -> dict[str, int]:
        """The counters of the service at ``url`` (``audience``), read as the principal allowed to."""
        import httpx

        caller = "party-0" if audience == "coordinator" else "coordinator"
        return httpx.get(f"{url}/metrics", headers=self.signer(caller).headers(audience),
                         verify=self.client_tls(caller)).json()

    @staticmethod
    def scrape(port: int) -> str:
        """The Prometheus text a service serves on its metrics ``port`` (plain HTTP, loopback, no token)."""
        import httpx

        resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        resp.raise_for_status()
        return resp.text

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.sup.log_dir.glob("*.log")))

    # clients ---------------------------------------------------------------------------------
    def signer(self, principal: str | None = None):
        """``principal``'s signer (default: the first client's)."""
        from protocols.auth import Signer

        if principal is None or principal in self.signers:
            return self.signers[principal or self.clients[0]]
        return Signer.from_file(self.key_file(principal))

    def client(self, hospital: str, **kw):
        """``hospital``'s FederatedClient (its own certificate with TLS); ``kw`` go to it."""
        from edge_server.federation.client import FederatedClient

        if self.tls is None:
            return FederatedClient(self.signer(hospital), self.coord_url, **kw)
        files = self.tls_hosts[hospital]
        return FederatedClient(self.signer(hospital), self.coord_url, ca=self.tls["ca"], cert=files.tls_cert,
                               key=files.tls_key, crl=self.tls["crl"], **kw)

    def federated_clients(self) -> dict:
        """A registered client per hospital (registering opens round 1 once all are in)."""
        out = {h: self.client(h) for h in self.clients}
        for c in out.values():
            c.register()
        return out

    def wait_round(self, client, rnd: int, states=("done", "failed"), timeout: float = 120.0):
        """The status of round ``rnd`` once it reaches one of ``states`` (or a later round began)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur = client.status().current
            if cur is not None and cur.config.round == rnd and cur.state in states:
                return cur
            if cur is not None and cur.config.round > rnd and "open" not in states:
                return client.round_status(rnd)
            time.sleep(ROUND_POLL_S)
        raise TimeoutError(f"round {rnd} did not reach {states}; see logs in {self.sup.log_dir}")


@contextlib.contextmanager
def serving(arch: str, state: dict, config: dict, prefix: str, parties: int = 2,
            env: dict[str, str] | None = None, timeout: float = READY_TIMEOUT_S) -> Iterator[LocalCloud]:
    """A started MPC cloud serving ``state`` secret-shared as global model version 1 (for experiments).

    The parties' stores (hundreds of MB of shares for AlexNet) live in a temporary folder,
    removed with the processes on exit.
    """
    from cloud_aggregator.inference.publish import publish_shared_model

    work = Path(tempfile.mkdtemp(prefix=prefix))
    cloud = LocalCloud(work, parties, ["experiment"], mpc=True, env=env, sup=Supervisor(work / "logs"))
    try:
        publish_shared_model(cloud.party_dirs, [state], [1], arch, config)
        yield cloud.start(timeout)
    finally:
        cloud.stop()
        shutil.rmtree(work, ignore_errors=True)
