"""`iomt broker`: a hospital MQTT broker on one port: Mosquitto when installed, else the embedded amqtt broker.

Mosquitto is the production broker (persistence, TLS, ACLs via its own config file). The
embedded broker (amqtt, MIT, pure Python) exists so `make demo` runs without root or
system packages; it is for demos and tests, not for a hospital: it keeps no sessions or
messages across restarts and is far slower than Mosquitto.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    p = sub.add_parser(name, help=help_line, description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--embedded", action="store_true", help="use the embedded pure-Python broker even if Mosquitto is installed")
    p.add_argument("--data-dir", type=Path, help="Mosquitto persistence directory (sessions and queued messages survive restarts)")
    p.add_argument("--config", type=Path, help="use this Mosquitto config file as is (TLS, passwords, ACLs)")
    p.set_defaults(func=run)


def mosquitto_config(host: str, port: int, data_dir: Path | None) -> str:
    lines = [f"listener {port} {host}", "allow_anonymous true",
             "max_queued_messages 1000000", "max_inflight_messages 1000"]
    if data_dir is not None:
        lines += ["persistence true", f"persistence_location {data_dir.resolve()}/", "autosave_interval 5"]
    else:
        lines.append("persistence false")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    exe = None if args.embedded else find_mosquitto()
    if exe is not None:
        conf = args.config
        if conf is None:
            if args.data_dir is not None:
                args.data_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="iomt-mosquitto-", suffix=".conf")
            with os.fdopen(fd, "w") as fh:
                fh.write(mosquitto_config(args.host, args.port, args.data_dir))
            conf = Path(name)
        log.info("exec %s -c %s", exe, conf)
        os.execv(exe, [exe, "-c", str(conf)])  # replaces this process: signals go straight to Mosquitto
    if args.config is not None or args.data_dir is not None:
        log.warning("--config/--data-dir apply to Mosquitto only; the embedded broker ignores them")
    return asyncio.run(serve_embedded(args.host, args.port))


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
