"""Start real processes (brokers, daemons, services) on loopback for integration tests."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM us when the test process dies, so an interrupted
    test run (Ctrl-C, a killed pytest) cannot leave brokers and services behind."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout}s")


def iomt_env(**extra: str) -> dict[str, str]:
    """Environment for an `iomt` subprocess that runs this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def iomt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "iomt", *args]


def run_iomt(*args: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(iomt_cmd(*args), env=iomt_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"iomt {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def spawn_iomt(*args: str, log: Path | None = None, **kw) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(iomt_cmd(*args), env=iomt_env(**kw.pop("env", {})), cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, **kw)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


class Mosquitto:
    """A real Mosquitto on a free loopback port, restartable on the same port."""

    def __init__(self, workdir: Path, persistence: bool = False) -> None:
        """``persistence=True`` keeps sessions and queued messages across :meth:`stop`/:meth:`start`."""
        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto); .ci/run installs it")
        self.exe = exe
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        store = workdir / "mosquitto-data"
        if persistence:
            store.mkdir(exist_ok=True)
        # Started as root, Mosquitto would drop to user "mosquitto", which cannot write into a
        # private temporary directory; "user root" keeps it as the user that started it.
        as_root = "user root\n" if persistence and hasattr(os, "geteuid") and os.geteuid() == 0 else ""
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            + (f"persistence true\npersistence_location {store}/\nautosave_interval 1\n" if persistence
               else "persistence false\n")
            + "max_queued_messages 1000000\nmax_inflight_messages 1000\n" + as_root
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None
