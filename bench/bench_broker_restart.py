"""The documented `iomt broker --data-dir D` restarted under device load: what is lost.

Run: ``python bench/bench_broker_restart.py [--devices 4 --frames 1000 --rate 200 --repeat 3 --user nobody
--autosave-changes 1]``.

Each run starts ``iomt broker --port P --data-dir D`` exactly as the README documents it (as
this user, or as ``--user`` through ``setpriv``), connects a persistent QoS 1 subscriber (the
edge's kind of session) and ``--devices`` device agents (QoS 1, on-disk outbox: a message
leaves it only on PUBACK), publishes ``--frames`` one-second ECG frames per device at
``--rate`` frames/s each, stops the broker halfway with SIGTERM or SIGKILL, starts it again
with the same command 0.5 s later, lets the agents drain and counts the distinct frames the
subscriber received. The subscriber is either connected throughout ("online") or offline from
before the first frame until after the restart ("offline": the broker must hold everything).

``--backlog N`` instead measures what saving costs: the subscriber offline, ``N`` frames
published as fast as the agents go, the broker's CPU seconds and the time until the broker
had acknowledged them all (each save rewrites the whole store, so with
``--autosave-changes`` this grows with the backlog).

Prints one JSON object per run.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import device_agent.agent as agent_mod  # noqa: E402
from iomt.broker_restart import restart_under_load  # noqa: E402
from iomt.local_broker import Mosquitto  # noqa: E402


def _broker(work: Path, args: argparse.Namespace) -> Mosquitto:
    extra = () if args.autosave_changes is None else ("--autosave-changes", str(args.autosave_changes))
    return Mosquitto(work, persistence=True, user=args.user, broker_args=("--allow-anonymous", *extra)).start()


def restarts(args: argparse.Namespace) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for offline in (False, True):
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory(prefix="iomt-bench-broker-") as tmp:
                    broker = _broker(Path(tmp), args)
                    try:
                        out = restart_under_load(broker, Path(tmp), sig, devices=args.devices, frames=args.frames,
                                                 rate=args.rate, subscriber_offline=offline)
                    finally:
                        broker.stop()
                print(json.dumps({"user": args.user or pwd.getpwuid(os.geteuid()).pw_name,
                                  "autosave_changes": args.autosave_changes, **out.as_dict()}),
                      flush=True)


def backlog(args: argparse.Namespace) -> None:
    import numpy as np

    from device_agent.agent import DeviceAgent
    from device_agent.settings import AgentSettings
    from protocols.messages import SignalFrame
    from iomt.mqtt_collector import Collector

    tmp = tempfile.TemporaryDirectory(prefix="iomt-bench-broker-")
    base = Path(tmp.name)
    broker = _broker(base, args)
    try:
        Collector(broker.port, pattern="iomt/h1/+/+/ecg", durable=True, client_id="edge-like").close()
        per = args.backlog // args.devices
        agents = [DeviceAgent(AgentSettings(broker=broker.url, hospital="h1", device_id=f"w-{d}",
                                            streams={"ecg": 250.0}, buffer_path=base / f"outbox-{d}.sqlite3")).start()
                  for d in range(args.devices)]
        assert all(a.wait_connected(30) for a in agents)
        zeros = np.zeros(250, dtype=np.float32)
        cpu0 = _cpu_s(broker.proc.pid)
        t0 = time.monotonic()
        for seq in range(per):
            for d, a in enumerate(agents):
                a.publish(SignalFrame.build(f"w-{d}", "ecg", seq, 1.7e9 + seq, 250.0, zeros))
        assert all(a.flush(600) for a in agents)
        wall = time.monotonic() - t0
        cpu = _cpu_s(broker.proc.pid) - cpu0
        for a in agents:
            a.close()
        size = (broker.data_dir / "mosquitto.db").stat().st_size
        print(json.dumps({"user": args.user or pwd.getpwuid(os.geteuid()).pw_name,
                          "autosave_changes": args.autosave_changes, "backlog": per * args.devices,
                          "acked_in_s": round(wall, 2), "frames_per_s": round(per * args.devices / wall),
                          "broker_cpu_s": round(cpu, 2), "store_bytes": size}), flush=True)
    finally:
        broker.stop()
        tmp.cleanup()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--frames", type=int, default=1000, help="frames per device")
    p.add_argument("--rate", type=float, default=200.0, help="frames/s per device")
    p.add_argument("--repeat", type=int, default=3, help="runs per (signal, subscriber) case")
    p.add_argument("--user", help="run the broker command as this user (setpriv), e.g. nobody")
    p.add_argument("--autosave-changes", type=int, help="passed to iomt broker (default: its own, every second)")
    p.add_argument("--backlog", type=int, help="measure the cost of saving: this many frames queued")
    args = p.parse_args()
    agent_mod.BACKOFF_MIN_S, agent_mod.BACKOFF_MAX_S = 0.05, 0.4  # reconnect soon after the restart
    backlog(args) if args.backlog else restarts(args)


if __name__ == "__main__":
    main()
