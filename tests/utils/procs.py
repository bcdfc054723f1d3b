"""Start real processes (brokers, daemons, services) on loopback for integration tests."""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import weakref
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
    """A real Mosquitto on a free loopback port, restartable on the same port.

    Parameters
    ----------
    workdir
        Where the config (without persistence) and ``mosquitto.log`` go.
    persistence
        Keep sessions and queued messages across :meth:`stop`/:meth:`start`. The broker is then
        started with the documented command, ``iomt broker --port P --data-dir D``, so tests
        see what an operator gets (as root: Mosquitto dropping to its own user). ``D`` is in a
        world-searchable temporary folder, since that user cannot enter pytest's 0700 ones;
        it is removed when this object goes away.
    user
        With ``persistence``: run the command as this unprivileged user (``setpriv``), with
        ``D`` made its own beforehand.
    broker_args
        With ``persistence``: more ``iomt broker`` flags (e.g. ``--autosave-changes 1``), or
        ``--allow-anonymous`` when empty; they must say who may connect.
    """

    def __init__(self, workdir: Path, persistence: bool = False, user: str | None = None,
                 broker_args: tuple[str, ...] = ()) -> None:
        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto); .ci/run installs it")
        self.exe = exe
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.env: dict[str, str] | None = None
        self.data_dir: Path | None = None
        if persistence:
            base = Path(tempfile.mkdtemp(prefix="iomt-test-broker-"))
            base.chmod(0o755)
            weakref.finalize(self, shutil.rmtree, base, True)
            self.data_dir = base / "data"
            if user is not None:
                account = pwd.getpwnam(user)
                self.data_dir.mkdir()
                os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            self.cmd = iomt_cmd("-v", "broker", "--port", str(self.port), "--data-dir", str(self.data_dir),
                                *(broker_args or ("--allow-anonymous",)))
            self.env = iomt_env()
            if user is not None:
                self.cmd, self.env = as_user(user, self.cmd, self.env)
        else:
            self.conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 1000000\nmax_inflight_messages 1000\n")
            self.cmd = [exe, "-c", str(self.conf)]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> "Mosquitto":
        with open(self.workdir / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
        try:
            wait_port(self.port)
        except TimeoutError:
            stop(self.proc)
            raise AssertionError(f"broker did not listen:\n{self.log_text()[-3000:]}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the broker with ``sig`` (SIGKILL: as if it crashed) and wait for it."""
        code = None
        if self.proc is not None:
            code = stop(self.proc, sig)
            self.proc = None
        return code


def as_user(user: str, cmd: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``cmd`` (a Python command line) run as ``user`` through ``setpriv``, with a Python that user may run.

    Our interpreter may live where that user cannot go (a pyenv in root's home); then the
    system ``python3`` of the same minor version runs it with our site-packages on its path.
    Raises ``LookupError`` when there is no such interpreter, no ``setpriv`` or no ``user``.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        raise LookupError("running as another user needs root and setpriv (util-linux)")
    try:
        account = pwd.getpwnam(user)
    except KeyError as err:
        raise LookupError(f"no user {user}") from err
    prefix = [setpriv, f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
    env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO), *site.getsitepackages()])}
    wanted = f"{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, shutil.which(f"python{wanted}"), shutil.which("python3")):
        if exe is None:
            continue
        probe = subprocess.run([*prefix, exe, "-c", "import sys, device_agent.broker_cli; print(sys.version)"],
                               env=env, cwd="/", capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.startswith(wanted + "."):
            return [*prefix, exe, *cmd[1:]], env
    raise LookupError(f"no Python {wanted} that user {user} can run with this checkout")
