"""The documented `iomt broker --data-dir D` restarted under device load, and what a subscriber got.

Shared by ``tests/device_agent/test_broker_persistence.py`` and ``bench/bench_broker_restart.py``.
The broker is ``Mosquitto(workdir, persistence=True)``: started exactly as the README says
(optionally as another user, through ``setpriv``); devices are real device agents with their
on-disk outbox; the subscriber is a persistent QoS 1 session (what the edge daemon holds), which is
either connected throughout or offline while the broker holds its messages.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from device_agent.agent import DeviceAgent
from device_agent.settings import AgentSettings
from protocols.messages import SignalFrame
from iomt.mqtt_collector import Collector
from iomt.local_broker import Mosquitto

HOSPITAL = "h1"


@dataclass
class Outcome:
    """What one restart did: every count is of distinct (device, seq) frames."""

    signal: str
    subscriber: str
    published: int
    acked_before_stop: int  # PUBACKed by the broker before it was stopped
    delivered: int
    lost: int  # published (and, after the final flush, all PUBACKed) but never delivered
    duplicates: int  # deliveries beyond the first of a frame (QoS 1 allows them)
    save_errors: int  # "Error saving in-memory database" lines in the broker's log

    def as_dict(self) -> dict:
        return asdict(self)


def restart_under_load(broker: Mosquitto, workdir: Path, sig: int, *, devices: int = 3, frames: int = 300,
                       rate: float = 200.0, subscriber_offline: bool = False, down_s: float = 0.5,
                       settle_s: float = 2.5) -> Outcome:
    """Publish ``frames`` ECG frames from each of ``devices`` agents at ``rate`` frames/s
    each; halfway through stop the broker with ``sig``, start it again with the same command
    after ``down_s``, let the agents drain their outboxes and count what the subscriber got.

    ``subscriber_offline`` disconnects the subscriber (its session and subscription stay on
    the broker) before publishing starts and brings it back after the restart: the broker
    must then hold every message across the restart, like it does for an edge under maintenance.
    The subscriber subscribes ``settle_s`` before the devices start, so that its session is
    in the broker's store however seldom the broker saves (an edge has been subscribed for long).
    """
    sub = Collector(broker.port, pattern=f"iomt/{HOSPITAL}/+/+/ecg", durable=True, client_id="edge-like")
    if subscriber_offline:
        sub.close()
    time.sleep(settle_s)
    agents = [DeviceAgent(AgentSettings(broker=broker.url, hospital=HOSPITAL, device_id=f"w-{d}",
                                        patient_id=f"p-{d}", streams={"ecg": 250.0},
                                        buffer_path=workdir / f"outbox-{d}.sqlite3")).start()
              for d in range(devices)]
    signal_all = np.zeros(250, dtype=np.float32)
    halfway = threading.Event()

    def publish(agent: DeviceAgent, d: int) -> None:
        for seq in range(frames):
            if seq == frames // 2:
                halfway.set()
            agent.publish(SignalFrame.build(f"w-{d}", "ecg", seq, 1.7e9 + seq / 4, 250.0, signal_all))
            time.sleep(1 / rate)

    try:
        assert all(a.wait_connected(30) for a in agents)
        threads = [threading.Thread(target=publish, args=(a, d), daemon=True) for d, a in enumerate(agents)]
        for t in threads:
            t.start()
        assert halfway.wait(120)
        acked = sum(a.stats["queued"] - a.buffered for a in agents)  # the devices go on publishing
        broker.stop(sig)
        time.sleep(down_s)
        broker.start()
        for t in threads:
            t.join(120)
        assert all(a.flush(120) for a in agents), "agents could not drain their outboxes"
        if subscriber_offline:
            sub = Collector(broker.port, pattern=f"iomt/{HOSPITAL}/+/+/ecg", durable=True, client_id="edge-like")
        wanted = devices * frames
        _wait_quiet(sub, wanted)
    finally:
        for a in agents:
            a.close()
        sub.close()
    got = [(t.device_id, m.seq) for t, m in sub.decoded("ecg")]
    log_text = broker.log_text()
    return Outcome(signal=signal.Signals(sig).name, subscriber="offline" if subscriber_offline else "online",
                   published=devices * frames, acked_before_stop=acked, delivered=len(set(got)),
                   lost=devices * frames - len(set(got)), duplicates=len(got) - len(set(got)),
                   save_errors=log_text.count("Error saving in-memory database"))


def _wait_quiet(sub: Collector, wanted: int, quiet_s: float = 3.0, limit_s: float = 120.0) -> None:
    """Until the subscriber has ``wanted`` distinct frames, or nothing new came for ``quiet_s``."""
    last, last_change, start = -1, time.monotonic(), time.monotonic()
    while time.monotonic() - start < limit_s:
        n = len({(t.device_id, m.seq) for t, m in sub.decoded("ecg")})
        if n >= wanted:
            return
        if n != last:
            last, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > quiet_s:
            return
        time.sleep(0.1)
