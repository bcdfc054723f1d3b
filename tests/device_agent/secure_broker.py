"""A real Mosquitto with a TLS listener and a password file, built at test time.

The CA and the server certificate come from :func:`protocols.auth.make_tls` (the
``cryptography`` package); the password file from Debian's ``mosquitto_passwd``.
Anonymous clients are refused (``allow_anonymous false``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from protocols.auth import make_tls
from iomt.local_broker import Mosquitto


def mosquitto_passwd_path() -> str | None:
    return shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd") if os.access(p, os.X_OK)),
        None)


class SecureMosquitto(Mosquitto):
    """Mosquitto on a free loopback port that speaks only TLS and wants a user name and password.

    Parameters
    ----------
    workdir
        Where the configuration, certificates, password file and log go.
    users
        User name -> password, written with ``mosquitto_passwd -b``.
    """

    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        super().__init__(workdir)
        tool = mosquitto_passwd_path()
        if tool is None:
            raise RuntimeError("mosquitto_passwd is not installed (it ships with Debian's mosquitto package)")
        self.tls = make_tls(workdir / "tls", hosts=("127.0.0.1", "localhost"))
        self.passwords = workdir / "passwords"
        self.passwords.touch()
        for user, password in users.items():
            subprocess.run([tool, "-b", str(self.passwords), user, password], check=True, capture_output=True)
        # Started as root, Mosquitto would drop to user "mosquitto", which cannot read the
        # private key in pytest's 0700 tmp dirs; "user root" keeps the user that started it.
        as_root = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {self.tls['ca']}\ncertfile {self.tls['cert']}\nkeyfile {self.tls['key']}\n"
            f"allow_anonymous false\npassword_file {self.passwords}\n"
            "persistence false\nmax_queued_messages 1000000\nmax_inflight_messages 1000\n" + as_root)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate that signed the broker's certificate (what clients trust)."""
        return self.tls["ca"]
