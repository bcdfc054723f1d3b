"""`iomt simulate`: publish a hospital's simulated cohort through real device agents and write a JSON report.

This module wires the simulators (which know only ``protocols``) to the device agent.

With ``--replay SOURCE`` the wearables play a real recording instead (see
:mod:`simulators.replay`). Exit codes: 0 all acknowledged; 1 some messages unacknowledged;
2 the replay source is missing or malformed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from simulators.cohort import generate_cohort, hospital_profile


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    p = sub.add_parser(name, help=help_line, description=__doc__.splitlines()[0])
    p.add_argument("--hospital", required=True, help="hospital id (letters, digits, _ . -)")
    p.add_argument("--broker", required=True, help="mqtt://host:port of the hospital broker")
    p.add_argument("--patients", type=int, default=20)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of wearable signal per patient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", type=int, help="hospital's index in the federation (picks its label skew)")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--realtime", action="store_true", help="pace frames at one simulated second per second")
    p.add_argument("--start-ts", type=float, help="unix time of the first sample (default: now)")
    p.add_argument("--buffer-dir", type=Path, help="where the agents keep their on-disk buffers")
    p.add_argument("--mqtt-version", choices=["3.1.1", "5"], default="3.1.1")
    p.add_argument("--replay", metavar="SOURCE",
                   help="play a real recording on the wearables instead of simulating: 'pyphysio' (its "
                        "GPL-3.0 test recording; pip install --no-deps pyphysio==4.10.0) or a .npz path")
    p.set_defaults(func=run)


def _write(report: dict, path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    else:
        print(text)


def device_agents(args: argparse.Namespace):
    """A publisher factory that makes one real device agent per device, buffered on disk."""
    from device_agent.agent import DeviceAgent
    from device_agent.settings import AgentSettings

    buffer_dir = Path(args.buffer_dir or tempfile.mkdtemp(prefix="iomt-sim-"))

    def make(device_class: str, device_id: str, patient_id: str, streams: dict[str, float]) -> DeviceAgent:
        return DeviceAgent(AgentSettings(
            broker=args.broker, hospital=args.hospital, device_class=device_class, device_id=device_id,
            patient_id=patient_id, streams=streams, buffer_path=buffer_dir / f"{device_id}.sqlite",
            mqtt_version=args.mqtt_version, model=f"sim-{device_class}", manufacturer="iomt-simulator"))
    return make


def _publish(patients, args: argparse.Namespace):
    from simulators.publish import publish_cohort  # needs paho; the pure generator does not

    return publish_cohort(patients, device_agents(args), args.hospital,
                          args.start_ts if args.start_ts is not None else round(time.time(), 3),
                          realtime=args.realtime)


def _replay(args: argparse.Namespace, profile) -> int:
    from simulators.replay import ReplayError, load_recording, replay_cohort

    try:
        recording = load_recording(args.replay)
    except ReplayError as err:
        print(f"error: --replay: {err}", file=sys.stderr)
        return 2
    patients = replay_cohort(recording, args.hospital, args.patients, args.duration, profile=profile)
    t0 = time.monotonic()
    published, unacked = _publish(patients, args)
    _write({
        "hospital": args.hospital,
        "duration_s": args.duration,
        "replay": {"source": recording.source, "licence": recording.licence, "fs": recording.fs,
                   "seconds": recording.seconds},
        "published": dict(sorted(published.items())),
        "patients": [p.patient_id for p in patients],
        "offsets_s": {p.patient_id: p.offset_s for p in patients},
        "rates": {s: rate for s, (rate, _) in (patients[0].streams.items() if patients else ())},
        "streams": {p.patient_id: sorted(p.streams) for p in patients},
        "devices": {p.patient_id: p.devices for p in patients},
        "unacknowledged": unacked,
        "wall_s": round(time.monotonic() - t0, 3),
    }, args.report)
    return 0 if unacked == 0 else 1


def run(args: argparse.Namespace) -> int:
    profile = hospital_profile(args.hospital, args.index)
    if args.replay:
        return _replay(args, profile)
    patients = generate_cohort(args.hospital, args.patients, args.seed, args.duration, profile=profile)
    t0 = time.monotonic()
    published, unacked = _publish(patients, args)
    report = {
        "hospital": args.hospital,
        "seed": args.seed,
        "duration_s": args.duration,
        "published": dict(sorted(published.items())),
        "patients": [p.patient_id for p in patients],
        "labels": {p.patient_id: p.condition for p in patients},
        "modalities": {p.patient_id: list(p.modalities()) for p in patients},
        "streams": {p.patient_id: sorted(p.streams) for p in patients},
        "devices": {p.patient_id: p.devices for p in patients},
        "profile": profile.as_dict(),
        "unacknowledged": unacked,
        "wall_s": round(time.monotonic() - t0, 3),
    }
    _write(report, args.report)
    return 0 if unacked == 0 else 1
