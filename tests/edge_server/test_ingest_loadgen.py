"""The bench's raw-socket load generator publishes valid frames that the edge's ingest accepts.

The ingest benchmark's honesty rests on it: every frame must reach a subscriber through a
real Mosquitto, carry the edge-valid bytes of the project's encoder, and be stamped with
its publish time.
"""
from __future__ import annotations

import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.mqtt_loadgen import frame_plan, publish
from edge_server.ingest.ingestor import Ingestor
from edge_server.ingest.store import Batch
from protocols.schema import SIGNAL_STREAMS
from simulators import payloads as b

pytestmark = pytest.mark.integration


def _subscriber(broker, got: list):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="loadgen-check", protocol=mqtt.MQTTv311)
    client.on_message = lambda c, u, m: got.append((m.topic, m.payload, time.time()))
    client.connect("127.0.0.1", broker.port)
    client.subscribe(f"iomt/{b.HOSPITAL}/#", qos=1)
    client.loop_start()
    time.sleep(0.3)
    return client


def test_loadgen_frames_arrive_valid_once_each_and_stamped_at_publish(mosquitto):
    devices, seconds = ["w-1", "w-2"], 5
    rng = np.random.default_rng(0)
    blocks = {s: rng.normal(size=(int(r), c)).astype("<f4").tobytes() for s, (c, r) in SIGNAL_STREAMS.items()}
    got: list = []
    client = _subscriber(mosquitto, got)
    try:
        fast = publish(mosquitto.port, "lg-fast", frame_plan(b.HOSPITAL, devices, seconds, SIGNAL_STREAMS),
                       blocks, rate=0, window=7)
        paced = publish(mosquitto.port, "lg-paced", frame_plan(b.HOSPITAL, devices, 2, SIGNAL_STREAMS),
                        blocks, rate=100)
        n = fast[0] + paced[0]
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()

    per_run = len(devices) * len(SIGNAL_STREAMS)
    assert (fast[0], paced[0], len(got)) == (per_run * seconds, per_run * 2, n)
    assert paced[1] >= (paced[0] - 1) / 100  # paced at (not above) the asked rate
    ing, batch = Ingestor(b.HOSPITAL), Batch()
    for d in devices:
        ing.handle(*b.registration(d, f"p-{d}"), batch, 0.0)
    outcomes = [ing.handle(topic, payload, batch, at) for topic, payload, at in got]
    assert all(o.accepted for o in outcomes), [o.reason for o in outcomes if not o.accepted][:3]
    keys = [(f.device_id, f.stream, f.seq) for f in batch.frames]
    assert len(set(keys[:fast[0]])) == fast[0]  # each frame once
    assert {s for _, s, _ in keys} == set(SIGNAL_STREAMS)
    lag = np.array([f.received_at - f.start_ts for f in batch.frames])
    assert (lag >= 0).all() and np.median(lag) < 5.0  # stamped when published, not before
