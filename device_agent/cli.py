"""`iomt device`: run one device agent that publishes its test pattern (or nothing) to a hospital broker."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from pathlib import Path

from device_agent.agent import DeviceAgent
from device_agent.settings import AgentSettings
from device_agent.testpattern import test_pattern
from protocols.config import add_config_argument, load_settings
from protocols.errors import ConfigError
from protocols.messages import SignalFrame
from protocols.schema import SIGNAL_STREAMS

log = logging.getLogger(__name__)

#: Exit code when the settings are invalid (unknown key, missing file, TLS option on mqtt://).
EXIT_CONFIG = 2


def _streams(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, _, rate = part.partition(":")
        if name not in SIGNAL_STREAMS:
            raise argparse.ArgumentTypeError(f"unknown stream {name!r}; known: {', '.join(SIGNAL_STREAMS)}")
        out[name] = float(rate) if rate else SIGNAL_STREAMS[name][1]
    return out


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    p = sub.add_parser(name, help=help_line, description=__doc__.splitlines()[0])
    add_config_argument(p, AgentSettings)
    p.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--hospital")
    p.add_argument("--device-id")
    p.add_argument("--patient-id")
    p.add_argument("--streams", type=_streams, help="wearable streams with rates, e.g. ecg:500,ppg:64,acc")
    p.add_argument("--buffer", type=Path, help="SQLite file of the on-disk buffer")
    p.add_argument("--mqtt-version", choices=["3.1.1", "5"])
    p.add_argument("--username", help="MQTT user name (password: IOMT_DEVICE_PASSWORD or --password-file)")
    p.add_argument("--password-file", type=Path, help="file whose first line is the MQTT password")
    p.add_argument("--ca-file", type=Path, help="PEM CA that signed the broker's certificate (mqtts://)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds of signal to publish (0: until stopped)")
    p.add_argument("--fast", action="store_true", help="publish simulated time as fast as possible")
    p.add_argument("--start-ts", type=float, help="unix time of the first sample (default: now)")
    p.add_argument("--json", action="store_true", help="print the agent's counters as JSON on exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {
        "broker": args.broker, "hospital": args.hospital, "device_id": args.device_id,
        "patient_id": args.patient_id, "streams": args.streams, "buffer_path": args.buffer,
        "mqtt_version": args.mqtt_version, "username": args.username, "ca_file": args.ca_file,
    }.items() if v is not None}
    try:
        if args.password_file is not None:
            overrides["password"] = (args.password_file.read_text().splitlines() or [""])[0]
        settings = load_settings(AgentSettings, args.config, overrides)
    except (ConfigError, OSError) as err:
        log.error("bad configuration: %s", err)
        return EXIT_CONFIG
    streams = settings.streams or {"ecg": SIGNAL_STREAMS["ecg"][1]}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    t0 = args.start_ts if args.start_ts is not None else time.time()
    wall0 = time.monotonic()
    second = 0
    with DeviceAgent(settings) as agent:
        while not stop.is_set() and (args.duration <= 0 or second < args.duration):
            for stream, rate in streams.items():
                frame = SignalFrame.build(settings.device_id, stream, second, t0 + second, rate,
                                          test_pattern(stream, rate, float(second)))
                agent.publish(frame, block=args.fast)
            second += 1
            if not args.fast:
                stop.wait(max(0.0, wall0 + second - time.monotonic()))
        if args.duration > 0:
            while not stop.is_set() and not agent.flush(0.5):
                pass  # SIGTERM/SIGINT still stop an agent whose broker refuses it
        stats = dict(agent.stats)
    if args.json:
        print(json.dumps({"seconds": second, **stats}))
    return 0
