"""A whole encrypted-inference cloud on loopback: the CrypTen parties and the triples provider.

Each party (`iomt cloud party`) and the trusted third party (`iomt cloud triples`) is its own
process, as in production; credentials for the named clients are written under ``work``.
Experiments start the processes through :class:`iomt.supervisor.Supervisor` (the default);
tests pass their own ``launch`` / ``stop`` so that the children die with the test process.
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from iomt.supervisor import Supervisor, free_port, iomt_argv, wait_port
from protocols.errors import IomtError

#: ``launch(name, iomt_args, extra_env)`` starts one process and returns it.
Launch = Callable[[str, list[str], dict[str, str]], subprocess.Popen]
READY_TIMEOUT_S = 120.0
PORT_TIMEOUT_S = 120.0


class CloudNotReady(IomtError):
    """The MPC parties did not all report ready in time."""


class MpcCloud:
    """``parties`` CrypTen parties and the triples provider as `iomt cloud` processes on 127.0.0.1."""

    def __init__(self, work: Path, clients: list[str], parties: int = 2, env: dict[str, str] | None = None,
                 launch: Launch | None = None, stop: Callable[[subprocess.Popen], Any] | None = None) -> None:
        from protocols.auth import Signer, make_credentials

        self.work, self.n, self.env = Path(work), parties, dict(env or {})
        self.registry = make_credentials(self.work / "creds", clients, parties)
        self.signers = {c: Signer.from_file(self.work / "creds" / "keys" / f"{c}.json") for c in clients}
        self.signer = self.signers[clients[0]]
        self.dirs = [self.work / f"party{i}" for i in range(parties)]
        self.master = f"127.0.0.1:{free_port()}"
        self.ports = [free_port() for _ in range(parties)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.procs: dict[str, subprocess.Popen] = {}
        self._sup: Supervisor | None = None
        if launch is None:
            self._sup = Supervisor(self.work / "logs")
            launch = self._supervised
        self._launch = launch
        self._stop = stop or self._stop_supervised

    def _supervised(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        return self._sup.start(name, iomt_argv(*args), env=env).proc

    def _stop_supervised(self, proc: subprocess.Popen) -> None:
        for child in self._sup.children:
            if child.proc is proc:
                self._sup.stop_child(child)

    def start_party(self, i: int) -> None:
        self.procs[f"party{i}"] = self._launch(f"party{i}", [
            "cloud", "party", "--index", str(i), "--parties", str(self.n), "--data-dir", str(self.dirs[i]),
            "--listen", f"127.0.0.1:{self.ports[i]}", "--registry", str(self.registry),
            "--mpc-master", self.master], self.env)

    def stop_party(self, i: int) -> None:
        self._stop(self.procs[f"party{i}"])

    def start(self, timeout: float = READY_TIMEOUT_S) -> MpcCloud:
        """Start the provider and every party; return once all parties' MPC groups are ready."""
        self.procs["ttp"] = self._launch("ttp", ["cloud", "triples", "--parties", str(self.n),
                                                 "--mpc-master", self.master], self.env)
        for i in range(self.n):
            self.start_party(i)
        for i, port in enumerate(self.ports):
            wait_port(port, timeout=PORT_TIMEOUT_S, proc=self.procs[f"party{i}"], name=f"party{i}")
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._sup is not None:
                self._sup.check()
            try:
                if all(httpx.get(f"{u}/inference/v1/status", timeout=5).json()["ready"] for u in self.urls):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise CloudNotReady(f"the MPC parties did not become ready within {timeout:.0f}s (logs in {self.work})")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            self._stop(proc)


@contextlib.contextmanager
def serving(arch: str, state: dict, config: dict, prefix: str, parties: int = 2,
            env: dict[str, str] | None = None, timeout: float = READY_TIMEOUT_S) -> Iterator[MpcCloud]:
    """A started cloud serving ``state`` secret-shared as global model version 1 (for experiments).

    The parties' stores (hundreds of MB of shares for AlexNet) live in a temporary folder,
    removed with the processes on exit.
    """
    from cloud_aggregator.inference.publish import publish_shared_model

    work = Path(tempfile.mkdtemp(prefix=prefix))
    cloud = MpcCloud(work, ["experiment"], parties, env=env)
    try:
        publish_shared_model(cloud.dirs, [state], [1], arch, config)
        yield cloud.start(timeout)
    finally:
        cloud.stop()
        shutil.rmtree(work, ignore_errors=True)
