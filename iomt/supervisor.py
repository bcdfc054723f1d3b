"""Run the system's roles as separate processes and stop every one of them cleanly.

Each child gets its own process group and a log file; stopping sends SIGTERM to the group,
waits, then SIGKILL. Used by `iomt demo` and by anything else that starts a whole
federation on one machine.
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

log = logging.getLogger(__name__)

STOP_GRACE_S = 15.0
REPO_ROOT = Path(__file__).resolve().parents[1]


class ChildFailed(RuntimeError):
    """A supervised process exited while it was expected to keep running."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 60.0,
              proc: subprocess.Popen | None = None, name: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ChildFailed(f"{name or 'process'} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name or 'nothing'} listened on {host}:{port} within {timeout:.0f}s")


def iomt_argv(*args: str) -> list[str]:
    """The command line that runs `iomt` from this same installation."""
    return [sys.executable, "-m", "iomt", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


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
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              daemon: bool = True, capture: bool = False) -> Child:
        """Start ``argv``; its output goes to ``<name>.log`` (stdout to ``<name>.out`` if ``capture``)."""
        log_path = self.log_dir / f"{name}.log"
        err = open(log_path, "ab")
        out = open(self.log_dir / f"{name}.out", "wb") if capture else err
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=child_env(env), cwd=REPO_ROOT, start_new_session=True)
        out.close()
        err.close()
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

    def stop_child(self, child: Child, grace: float = STOP_GRACE_S) -> int | None:
        proc = child.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0fs; killing it", child.name, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for child in reversed(self.children):
            self.stop_child(child)

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
