"""The one process launcher: start `iomt` roles (and Mosquitto) as children, and stop them cleanly.

Each child runs in its own process group, asks Linux to SIGTERM it when its parent dies
(so an interrupted demo, experiment, test run or bench cannot leave services behind), and
writes to a log file; stopping sends a signal to the group, waits, then SIGKILL. Used by
`iomt demo`, the experiments' MPC cloud (:mod:`iomt.local_cloud`), the tests and the benches.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocols.errors import IomtError

log = logging.getLogger(__name__)

STOP_GRACE_S = 15.0
PORT_TIMEOUT_S = 60.0
REPO_ROOT = Path(__file__).resolve().parents[1]


class ChildFailed(IomtError):
    """A supervised process exited while it was expected to keep running (or failed)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = PORT_TIMEOUT_S,
              proc: subprocess.Popen | None = None, name: str = "") -> None:
    """Return once ``host:port`` accepts connections; raise if ``proc`` exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ChildFailed(f"{name or 'process'} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{name or 'nothing'} listened on {host}:{port} within {timeout:.0f}s")


def iomt_argv(*args: str) -> list[str]:
    """The command line that runs `iomt` from this same installation."""
    return [sys.executable, "-m", "iomt", *args]


def child_env(extra: dict[str, str] | None = None, one_thread: bool = False) -> dict[str, str]:
    """Environment for a child that runs this checkout's code.

    ``one_thread`` caps each child's OpenMP threads at one unless set already (tests and
    benches start many processes on few cores).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if one_thread:
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def die_with_parent() -> None:
    """In the child (``preexec_fn``): a process group of its own, and SIGTERM when the parent dies."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(argv: list[str], log_path: Path | None = None, env: dict[str, str] | None = None,
          **popen_kw) -> subprocess.Popen:
    """Start ``argv`` in its own process group, dying with us; stdout and stderr appended to ``log_path``.

    ``env`` is the child's whole environment (default: ours).
    """
    opened = log_path is not None and "stdout" not in popen_kw
    out = popen_kw.pop("stdout", open(log_path, "ab") if opened else subprocess.DEVNULL)
    try:
        popen_kw.setdefault("stderr", subprocess.STDOUT)
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(argv, env=env, cwd=popen_kw.pop("cwd", REPO_ROOT), stdout=out,
                                preexec_fn=die_with_parent, **popen_kw)
    finally:
        if opened:
            out.close()


def spawn_iomt(*args: str, log: Path | None = None, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """Start ``iomt args`` from this checkout (see :func:`spawn`); ``env`` adds to the environment."""
    return spawn(iomt_argv(*args), log, child_env(env, one_thread=True), **kw)


def run_iomt(*args: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``iomt args`` from this checkout to completion, capturing its output; raise if it fails."""
    proc = subprocess.run(iomt_argv(*args), env=child_env(one_thread=True), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, **kw)
    if check and proc.returncode != 0:
        raise ChildFailed(f"iomt {' '.join(args)} exited {proc.returncode}\n"
                          f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_GRACE_S,
         name: str = "") -> int | None:
    """Send ``sig`` to ``proc``'s process group and wait; SIGKILL it after ``timeout`` s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        _wait_or_kill(proc, sig, timeout, name)
    return proc.returncode


def _wait_or_kill(proc: subprocess.Popen, sig: int, timeout: float, name: str) -> None:
    """Wait ``timeout`` s for ``proc``, already sent ``sig``; SIGKILL its group after that."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s ignored signal %d for %.0fs; killing it", name or proc.pid, sig, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    daemon: bool = True  # expected to run until stopped


@dataclass
class Supervisor:
    """Start children, watch them, and stop them all (in reverse order) on exit."""

    log_dir: Path
    one_thread: bool = False  # see child_env
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              daemon: bool = True, capture: bool = False) -> Child:
        """Start ``argv``; its output goes to ``<name>.log`` (stdout to ``<name>.out`` if ``capture``)."""
        log_path = self.log_dir / f"{name}.log"
        if capture:
            with open(log_path, "ab") as err, open(self.log_dir / f"{name}.out", "wb") as out:
                proc = spawn(argv, env=child_env(env, self.one_thread), stdout=out, stderr=err)
        else:
            proc = spawn(argv, log_path, child_env(env, self.one_thread))
        child = Child(name, proc, log_path, daemon)
        self.children.append(child)
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv[2:]))
        return child

    def run(self, name: str, argv: list[str], env: dict[str, str] | None = None,
            timeout: float | None = None) -> str:
        """Run a child to completion; return its stdout (stderr is kept in its log); raise if it fails."""
        child = self.start(name, argv, env, daemon=False, capture=True)
        try:
            rc = child.proc.wait(timeout)
        except subprocess.TimeoutExpired as err:
            self.stop_child(child)
            raise ChildFailed(f"{name} did not finish within {timeout}s; see {child.log_path}") from err
        if rc != 0:
            raise ChildFailed(f"{name} exited with {rc}; last lines of {child.log_path}:\n{self.tail(child)}")
        return (self.log_dir / f"{name}.out").read_text()

    @staticmethod
    def tail(child: Child, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(child.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def check(self) -> None:
        """Raise if a daemon child died."""
        for child in self.children:
            if child.daemon and child.proc.poll() is not None:
                raise ChildFailed(f"{child.name} exited with {child.proc.returncode}; "
                                  f"last lines of {child.log_path}:\n{self.tail(child)}")

    def stop_child(self, child: Child, grace: float = STOP_GRACE_S, sig: int = signal.SIGTERM) -> int | None:
        """Stop ``child`` with ``sig`` (SIGKILL: as if it crashed); :meth:`check` no longer expects it."""
        child.daemon = False
        return stop(child.proc, sig, grace, child.name)

    def stop_all(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every child at once (newest first), then wait for them together and SIGKILL
        whoever is still there after ``grace`` s: one grace period in all, not one per child."""
        running = [c for c in reversed(self.children) if c.proc.poll() is None]
        for child in running:
            child.daemon = False
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in running:
            # wait only: a second SIGTERM makes uvicorn skip its graceful shutdown
            _wait_or_kill(child.proc, signal.SIGTERM, max(0.0, deadline - time.monotonic()), child.name)

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
