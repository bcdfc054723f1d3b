"""Staff accounts of the clinician's page: ``<data-dir>/web/users.json``, argon2id hashes.

Managed with `iomt edge users add|list|remove`; the file is written atomically with mode
0600. Passwords are hashed with argon2-cffi's defaults (RFC 9106 argon2id) and re-hashed on
sign-in when those parameters change.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from protocols.errors import IomtError

USERS_FILE = Path("web") / "users.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10
EXIT_OK, EXIT_USAGE = 0, 2


class AccountError(IomtError):
    """A bad user name or password, or an unknown user."""


class Accounts:
    """The users file of one edge data dir."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / USERS_FILE
        self._hasher = PasswordHasher()
        self._lock = threading.Lock()
        # verify() against this when the user does not exist, so timing does not tell
        self._dummy = self._hasher.hash("not-a-password-" + os.urandom(8).hex())

    def _read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        return json.loads(self.path.read_text()).get("users", {})

    def _write(self, users: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"users": users}, f, indent=1)
        os.replace(tmp, self.path)

    def add(self, name: str, password: str) -> None:
        if not NAME_RE.match(name):
            raise AccountError(f"bad user name {name!r}: letters, digits and . _ @ - (at most 64)")
        if len(password) < MIN_PASSWORD:
            raise AccountError(f"password too short: at least {MIN_PASSWORD} characters")
        with self._lock:
            users = self._read()
            users[name] = {"hash": self._hasher.hash(password), "created": time.time()}
            self._write(users)

    def remove(self, name: str) -> None:
        with self._lock:
            users = self._read()
            if users.pop(name, None) is None:
                raise AccountError(f"no user {name!r}")
            self._write(users)

    def names(self) -> list[str]:
        return sorted(self._read())

    def exists(self, name: str) -> bool:
        return name in self._read()

    def verify(self, name: str, password: str) -> bool:
        """True iff ``name`` exists and ``password`` is its password."""
        entry = self._read().get(name)
        try:
            self._hasher.verify(entry["hash"] if entry else self._dummy, password)
        except (VerificationError, InvalidHashError):
            return False
        if entry is None:
            return False
        if self._hasher.check_needs_rehash(entry["hash"]):
            with self._lock:
                users = self._read()
                if name in users:
                    users[name]["hash"] = self._hasher.hash(password)
                    self._write(users)
        return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("op", choices=("add", "list", "remove"), help="what to do")
    parser.add_argument("name", nargs="?", help="user name (add, remove)")
    parser.add_argument("--data-dir", required=True, type=Path, help="the edge's data directory")
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of stdin (default: prompt)")


def run(args: argparse.Namespace) -> int:
    accounts = Accounts(args.data_dir)
    if args.op == "list":
        for name in accounts.names():
            print(name)
        return EXIT_OK
    if not args.name:
        print(f"error: `iomt edge users {args.op}` needs a user name", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.op == "remove":
            accounts.remove(args.name)
        else:
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass()
            accounts.add(args.name, password)
    except AccountError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.op} {args.name}: done")
    return EXIT_OK
