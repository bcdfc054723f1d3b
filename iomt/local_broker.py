"""A local MQTT broker for tests and benches: a real Mosquitto on a free loopback port,
restartable on the same port, started through :mod:`iomt.supervisor`."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

from iomt.supervisor import REPO_ROOT, ChildFailed, child_env, free_port, iomt_argv, spawn, stop, wait_port


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
            self.cmd = iomt_argv("-v", "broker", "--port", str(self.port), "--data-dir", str(self.data_dir),
                                *(broker_args or ("--allow-anonymous",)))
            self.env = child_env(one_thread=True)
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
        self.proc = spawn(self.cmd, self.workdir / "mosquitto.log", self.env)
        try:
            wait_port(self.port)
        except TimeoutError:
            stop(self.proc)
            raise ChildFailed(f"broker did not listen:\n{self.log_text()[-3000:]}") from None
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
    env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *site.getsitepackages()])}
    wanted = f"{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, shutil.which(f"python{wanted}"), shutil.which("python3")):
        if exe is None:
            continue
        probe = subprocess.run([*prefix, exe, "-c", "import sys, device_agent.broker_cli; print(sys.version)"],
                               env=env, cwd="/", capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.startswith(wanted + "."):
            return [*prefix, exe, *cmd[1:]], env
    raise LookupError(f"no Python {wanted} that user {user} can run with this checkout")
