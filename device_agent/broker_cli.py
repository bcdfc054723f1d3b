"""`iomt broker`: a hospital MQTT broker on one port: Mosquitto when installed, else the embedded amqtt broker.

Mosquitto is the production broker (persistence, TLS, ACLs via its own config file). The
embedded broker (amqtt, MIT, pure Python) exists so `make demo` runs without root or
system packages; it is for demos and tests, not for a hospital: it keeps no sessions or
messages across restarts and is far slower than Mosquitto.

The generated Mosquitto config never touches the file system: on Linux it is handed over as
an anonymous in-memory file (``memfd_create``, read through ``/dev/fd/N``), and this process
becomes Mosquitto (``exec``), so signals reach the broker itself and nothing is left behind
however it stops. Elsewhere it goes into a private temporary directory that is removed when
Mosquitto exits. Started as root, Mosquitto drops to an unprivileged user (``--user``, by
default ``mosquitto``, else ``nobody``, as Mosquitto itself would); the data directory is
handed to that user first, and the command refuses to start if that user could not write it.

Accounts (``--hospital H --passwords FILE``): every account in the ``mosquitto_passwd`` file is
a device whose user name is its device id, except the edge's (``edge-H`` unless
``--edge-user``); with ``--client-ca PEM`` instead, the common name of the client certificate
that CA signed is the account. The generated ACL (another in-memory file) lets a device publish only under
``iomt/H/+/<its user name>/+`` and read nothing; only the edge reads ``iomt/H/#``. The listener
uses the user name as the MQTT client id, so nobody can take another account's client id or
resume the edge's persistent session without the edge's password. Anonymous access exists only
behind ``--allow-anonymous`` (a demo on one machine); a listener off loopback needs TLS
(``--tls-cert``/``--tls-key``) unless ``--allow-plain``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from device_agent.settings import BrokerSettings
from protocols.config import load_settings
from protocols.errors import ConfigError, IomtError
from protocols.netaddr import is_loopback
from protocols.topics import ID_PATTERN, PREFIX

log = logging.getLogger(__name__)
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
# Files Mosquitto keeps in its persistence directory (the store and its save-in-progress copy).
DB_FILES = ("mosquitto.db", "mosquitto.db.new")
# Mosquitto saves its in-memory store on a clean stop and every AUTOSAVE_S seconds (2.0.11
# saves once more than AUTOSAVE_S whole seconds have passed: about every 2 s for 1). A save
# rewrites the whole store, so saving more often costs more the larger the backlog; see the
# README's "iomt broker" section for what a SIGKILL can lose and what --autosave-changes does.
AUTOSAVE_S = 1
EXIT_BAD_SETUP = 2  # like every `iomt` command: bad configuration


class BrokerSetupError(IomtError):
    """The broker cannot start as asked (data directory, user); the message says what to change."""


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    p = sub.add_parser(name, help=help_line, description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="FILE.toml: BrokerSettings keys (the flags below with _ for -; precedence flag > "
                        "environment IOMT_BROKER_* > file > default; unknown keys are an error); any other "
                        "FILE: a Mosquitto config file used as is (TLS, passwords, ACLs)")
    p.add_argument("--port", type=int, help="default 1883")
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--embedded", action="store_true", default=None,
                   help="use the embedded pure-Python broker even if Mosquitto is installed")
    p.add_argument("--data-dir", type=Path, help="Mosquitto persistence directory (sessions and queued messages survive restarts)")
    p.add_argument("--user", help="started as root, Mosquitto runs as this user, which gets the data directory "
                                  "(default: mosquitto if that user exists, else nobody)")
    p.add_argument("--autosave-changes", type=int, metavar="N",
                   help="save the store after every N changes (messages queued or taken off a queue, "
                        "sessions, subscriptions) instead of every second; 1 bounds what a SIGKILL loses "
                        "to one event-loop pass but makes a large backlog slow")
    acc = p.add_argument_group("accounts", "who may connect and what each account may do")
    acc.add_argument("--hospital", help="the hospital this broker serves (its topics iomt/HOSPITAL/...)")
    acc.add_argument("--passwords", type=Path, metavar="FILE",
                     help="mosquitto_passwd file: one account per device (user name = device id) and the edge's")
    acc.add_argument("--edge-user", metavar="NAME", help="the edge's account, the only one that reads "
                                                          "(default: edge-HOSPITAL)")
    acc.add_argument("--tls-cert", type=Path, metavar="PEM", help="the broker's certificate (chain): a TLS listener")
    acc.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    acc.add_argument("--client-ca", type=Path, metavar="PEM",
                     help="instead of --passwords: every client shows a certificate this CA signed, whose "
                          "common name is its account (device id, or the edge's)")
    acc.add_argument("--allow-anonymous", action="store_true", default=None,
                     help="demo only: anyone who reaches the port may read and publish every topic")
    acc.add_argument("--allow-plain", action="store_true", default=None,
                     help="listen without TLS on a non-loopback --host (passwords and data cross the network in clear)")
    p.set_defaults(func=run)


def edge_user(hospital: str, requested: str | None = None) -> str:
    """The edge's account on a broker serving ``hospital``."""
    return requested or f"edge-{hospital}"


def acl_text(hospital: str, edge: str) -> str:
    """The ACL of a broker with accounts: each device writes only its own topics, only the edge reads.

    ``%u`` is the connecting account's user name; Mosquitto denies a pattern to a user name
    holding ``+``, ``#`` or ``/``, so a device cannot widen its own subtree.
    """
    return (f"# iomt broker: devices of {hospital} publish under their own id; only {edge} reads.\n"
            f"pattern write {PREFIX}/{hospital}/+/%u/+\n"
            f"user {edge}\n"
            f"topic read {PREFIX}/{hospital}/#\n")


def check_access(args: argparse.Namespace, account: pwd.struct_passwd | None) -> None:
    """Refuse (:class:`BrokerSetupError`) a broker that would let anyone in unasked, or that Mosquitto
    could not start as asked; log a WARNING for each insecure choice made explicitly."""
    if args.allow_anonymous and (args.passwords is not None or args.client_ca is not None):
        raise BrokerSetupError("--allow-anonymous excludes --passwords and --client-ca")
    if args.passwords is not None and args.client_ca is not None:
        raise BrokerSetupError("--passwords and --client-ca exclude each other (with client certificates the "
                               "certificate's common name is the account and passwords are not checked)")
    if args.client_ca is not None and args.tls_cert is None:
        raise BrokerSetupError("--client-ca needs a TLS listener: --tls-cert and --tls-key")
    if not args.allow_anonymous:
        if (args.passwords is None and args.client_ca is None) or args.hospital is None:
            raise BrokerSetupError(
                "the broker needs accounts: --hospital H --passwords FILE (made with mosquitto_passwd; each "
                "device's user name is its device id, the edge's edge-H) or --hospital H --client-ca PEM "
                "(certificates naming them), or --allow-anonymous for a demo")
        for what, value in (("--hospital", args.hospital), ("--edge-user", edge_user(args.hospital, args.edge_user))):
            if not ID_PATTERN.fullmatch(value):
                raise BrokerSetupError(f"{what} {value!r} must match {ID_PATTERN.pattern}")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise BrokerSetupError("--tls-cert and --tls-key go together")
    if args.tls_cert is None and not is_loopback(args.host):
        if not args.allow_plain:
            raise BrokerSetupError(f"--host {args.host} is reachable from the network: give the listener TLS "
                                   "(--tls-cert, --tls-key), or pass --allow-plain to send passwords in clear")
        log.warning("plain MQTT on %s: passwords and patient data cross the network unencrypted", args.host)
    files = [f for f in (args.passwords, args.tls_cert, args.tls_key, args.client_ca) if f is not None]
    for f in files:
        if not f.is_file():
            raise BrokerSetupError(f"{f} is not a file")
    for f in files:  # Mosquitto reads them after dropping to its user
        blocked = _first_blocked(f.resolve(), account if account is not None and account.pw_uid != 0 else None,
                                 write=False)
        if blocked is not None:
            who = account.pw_name if account is not None else f"uid {os.geteuid()}"
            what = "read" if blocked == f.resolve() else "enter"
            raise BrokerSetupError(f"Mosquitto runs as {who}, which cannot {what} {blocked}; e.g. chgrp {who} and "
                                   f"chmod 0640 the password file and TLS key, and let {who} enter their folder")
    if args.allow_anonymous:
        log.warning("--allow-anonymous: anyone who reaches %s:%d may read and publish every topic (demo use only)",
                    args.host, args.port)


def mosquitto_config(host: str, port: int, data_dir: Path | None, user: str | None = None,
                     autosave_changes: int | None = None, passwords: Path | None = None,
                     acl_file: str | None = None, tls: tuple[Path, Path] | None = None,
                     client_ca: Path | None = None) -> str:
    """The config `iomt broker` runs Mosquitto with.

    ``user`` is the account a root-started Mosquitto drops to; ``autosave_changes`` saves the
    store after that many changes instead of every :data:`AUTOSAVE_S` seconds. Without
    ``passwords`` (and ``acl_file``, see :func:`acl_text`) anyone may connect; with them the
    user name is the client id. ``tls`` is (certificate, key) for a TLS listener; with
    ``client_ca`` (instead of ``passwords``) each client's certificate, which that CA must have
    signed, names its account.
    """
    lines = [f"listener {port} {host}"]
    if tls is not None:
        lines += [f"certfile {tls[0].resolve()}", f"keyfile {tls[1].resolve()}"]
    if client_ca is not None:
        lines += [f"cafile {client_ca.resolve()}", "require_certificate true", "use_identity_as_username true"]
    if passwords is None and client_ca is None:
        lines.append("allow_anonymous true")
    else:
        lines += ["allow_anonymous false", "use_username_as_clientid true", f"acl_file {acl_file}"]
        if passwords is not None:
            lines.append(f"password_file {passwords.resolve()}")
    lines += ["max_queued_messages 1000000", "max_inflight_messages 1000"]
    if user is not None:
        lines.append(f"user {user}")
    if data_dir is not None:
        lines += ["persistence true", f"persistence_location {data_dir.resolve()}/",
                  f"autosave_on_changes {'false' if autosave_changes is None else 'true'}",
                  f"autosave_interval {AUTOSAVE_S if autosave_changes is None else autosave_changes}"]
    else:
        lines.append("persistence false")
    return "\n".join(lines) + "\n"


def drop_user(requested: str | None) -> pwd.struct_passwd | None:
    """The account a Mosquitto started by us runs as, or None when it keeps ours (we are not root)."""
    if os.geteuid() != 0:
        if requested is not None:
            log.warning("--user %s applies only when started as root; Mosquitto runs as uid %d", requested,
                        os.geteuid())
        return None
    names = [requested] if requested else ["mosquitto", "nobody"]
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise BrokerSetupError(f"no user {' or '.join(names)} on this system to run Mosquitto as; pass --user NAME")


def _first_blocked(path: Path, account: pwd.struct_passwd | None, write: bool = True) -> Path | None:
    """The first directory on the way to ``path`` that ``account`` cannot search (``path``
    included when ``write``, a directory), or ``path`` itself when it cannot write (else read)
    it; None when all is well."""
    chain = [*reversed(path.parents), *([path] if write else [])]
    if account is None:
        for d in chain:
            if not os.access(d, os.X_OK):
                return d
        return None if os.access(path, os.W_OK if write else os.R_OK) else path
    # Ask as that user (with the groups Mosquitto's initgroups gives it): access rights, ACLs
    # and group membership are then the kernel's answer, not our reading of mode bits.
    script = ('for d; do [ -x "$d" ] || { printf %s "$d"; exit 1; }; done; '
              f'[ -{"w" if write else "r"} "$0" ] || {{ printf %s "$0"; exit 1; }}')
    done = subprocess.run(["/bin/sh", "-c", script, str(path), *map(str, chain)], capture_output=True, text=True,
                          user=account.pw_uid, group=account.pw_gid,
                          extra_groups=os.getgrouplist(account.pw_name, account.pw_gid))
    return Path(done.stdout) if done.returncode else None


def prepare_data_dir(data_dir: Path, account: pwd.struct_passwd | None) -> None:
    """Create ``data_dir`` and make it Mosquitto's: owned by ``account`` (when we are root) and
    writable by it all the way down, or raise :class:`BrokerSetupError` saying why not."""
    data_dir = data_dir.resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BrokerSetupError(f"cannot create the data directory {data_dir}: {err}") from err
    if account is not None and account.pw_uid != 0:
        owned = [data_dir, *(data_dir / f for f in DB_FILES if (data_dir / f).exists())]
        if any(p.stat().st_uid != account.pw_uid for p in owned):
            # Never chown a directory that holds anything but Mosquitto's store: a mistyped
            # --data-dir (/var/lib, a home) must not be handed to the broker's user.
            others = sorted(p.name for p in data_dir.iterdir() if p.name not in DB_FILES)
            if others:
                raise BrokerSetupError(
                    f"{data_dir} is not {account.pw_name}'s and holds other files ({', '.join(others[:5])}); "
                    "give the broker a directory of its own")
            for p in owned:
                os.chown(p, account.pw_uid, account.pw_gid)
            log.info("data directory %s handed to user %s", data_dir, account.pw_name)
    blocked = _first_blocked(data_dir, account if account is not None and account.pw_uid != 0 else None)
    if blocked is not None:
        who = account.pw_name if account is not None else f"uid {os.geteuid()}"
        what = "write" if blocked == data_dir else "enter"
        raise BrokerSetupError(
            f"Mosquitto runs as {who}, which cannot {what} {blocked}, so it could not save to {data_dir}; "
            "choose a data directory it can reach (e.g. under /var/lib) or another --user")


def settle(args: argparse.Namespace) -> None:
    """Fill ``args`` from :class:`BrokerSettings`: flag > ``IOMT_BROKER_*`` > ``--config X.toml`` > default.
    A ``--config`` that is not ``.toml`` is a Mosquitto config file (``args.config`` afterwards)."""
    toml = args.config if args.config is not None and args.config.suffix == ".toml" else None
    flags = {name: getattr(args, name, None) for name in BrokerSettings.model_fields}
    flags["mosquitto_config"] = None if toml is not None else args.config
    settings = load_settings(BrokerSettings, toml, flags, flag_names={"mosquitto_config": "--config"})
    for name, value in settings:
        setattr(args, name, value)
    args.config = settings.mosquitto_config


def run(args: argparse.Namespace) -> int:
    try:
        settle(args)
    except ConfigError as err:
        log.error("%s", err)
        return EXIT_BAD_SETUP
    exe = None if args.embedded else find_mosquitto()
    if exe is not None and args.config is not None:
        if any(v not in (None, False) for v in (args.data_dir, args.user, args.autosave_changes, args.hospital,
                                                args.passwords, args.tls_cert, args.client_ca, args.allow_anonymous)):
            log.warning("--data-dir/--user/--autosave-changes and the account and TLS flags are ignored with "
                        "--config: set them in %s", args.config)
        log.info("exec %s -c %s", exe, args.config)
        os.execv(exe, [exe, "-c", str(args.config)])
    try:
        if exe is None and not args.allow_anonymous:
            raise BrokerSetupError(("the embedded broker" if args.embedded else "without Mosquitto, the embedded "
                                    "broker") + " has no accounts: install Mosquitto, or pass --allow-anonymous "
                                   "for a demo")
        if args.autosave_changes is not None and args.autosave_changes < 1:
            raise BrokerSetupError("--autosave-changes must be 1 or more")
        if any("\n" in str(v) or "\r" in str(v) for v in (args.host, args.data_dir, args.user, args.passwords,
                                                          args.tls_cert, args.tls_key, args.client_ca)):
            raise BrokerSetupError("--host, --data-dir, --user, --passwords and --tls-* must be single lines "
                                   "(they go into the config)")
        account = drop_user(args.user) if exe is not None else None
        check_access(args, account)
        if exe is not None and args.data_dir is not None:
            prepare_data_dir(args.data_dir, account)
    except BrokerSetupError as err:
        log.error("%s", err)
        return EXIT_BAD_SETUP
    if exe is None:
        if args.data_dir is not None or args.tls_cert is not None:
            log.warning("--data-dir/--tls-* apply to Mosquitto only; the embedded broker ignores them")
        return asyncio.run(serve_embedded(args.host, args.port))
    accounts = args.passwords is not None or args.client_ca is not None
    acl = acl_text(args.hospital, edge_user(args.hospital, args.edge_user)) if accounts else None
    tls = None if args.tls_cert is None else (args.tls_cert, args.tls_key)

    def config(acl_path: str | None) -> str:
        return mosquitto_config(args.host, args.port, args.data_dir, account.pw_name if account else None,
                                args.autosave_changes, args.passwords, acl_path, tls, args.client_ca)

    if hasattr(os, "memfd_create"):
        exec_with_memfd_config(exe, config, acl)
    return run_with_temp_config(exe, config, acl)


def exec_with_memfd_config(exe: str, config, acl: str | None = None) -> None:
    """Become Mosquitto, reading ``config(acl path)`` (and the ``acl``) from in-memory files:
    nothing on disk to clean up, even after SIGKILL, and a SIGHUP reload re-reads the same files."""
    acl_path = None
    if acl is not None:
        afd = os.memfd_create("iomt-mosquitto.acl", 0)
        os.write(afd, acl.encode())
        acl_path = f"/dev/fd/{afd}"
    fd = os.memfd_create("iomt-mosquitto.conf", 0)  # flags 0: not close-on-exec, Mosquitto inherits it
    text = config(acl_path)
    os.write(fd, text.encode())
    log.info("exec %s -c /dev/fd/%d with:\n%s%s", exe, fd, text, f"and the ACL {acl_path}:\n{acl}" if acl else "")
    os.execv(exe, [exe, "-c", f"/dev/fd/{fd}"])  # replaces this process: signals go straight to Mosquitto


def run_with_temp_config(exe: str, config, acl: str | None = None) -> int:
    """Where there is no memfd: the config (and ACL) in a private temporary directory, Mosquitto
    as a child that gets our SIGTERM/SIGINT/SIGHUP, the directory removed when it exits."""
    with tempfile.TemporaryDirectory(prefix="iomt-broker-") as tmp:
        os.chmod(tmp, 0o755)  # Mosquitto reads the ACL after dropping to its user
        acl_path = None
        if acl is not None:
            acl_path = str(Path(tmp) / "acl")
            Path(acl_path).write_text(acl)
        conf = Path(tmp) / "mosquitto.conf"
        text = config(acl_path)
        conf.write_text(text)
        log.info("%s -c %s with:\n%s", exe, conf, text)
        proc: subprocess.Popen | None = None
        early: list[int] = []

        def forward(sig: int, _frame) -> None:
            early.append(sig) if proc is None else proc.send_signal(sig)

        # Handlers first: a SIGTERM that came before them would kill us and leave the config.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        proc = subprocess.Popen([exe, "-c", str(conf)])  # exec resets the handlers in the child
        for sig in early:
            proc.send_signal(sig)
        return proc.wait()


async def serve_embedded(host: str, port: int, stop: asyncio.Event | None = None) -> int:
    """Run amqtt on ``host:port`` until SIGTERM/SIGINT (or ``stop`` is set)."""
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = Broker(config)
    await broker.start()
    log.warning("embedded amqtt broker on %s:%d (demo use only: no persistence)", host, port)
    await stop.wait()
    await broker.shutdown()
    return 0
