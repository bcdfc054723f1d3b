"""Bad input and faults against a real Mosquitto and real `iomt edge run` processes.

Every bad-input case of the ingest spec is rejected with its reason and counter while every
valid message around it is stored; a daemon killed with SIGKILL mid-stream and restarted
ends with each published frame exactly once; a broker restarted mid-stream (with
persistence) loses nothing either, the device agent draining its buffer after reconnecting.
"""
from __future__ import annotations

import math
import signal
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from protocols.frames import DTYPES, MAX_PAYLOAD, pack_raw
from simulators import payloads as b
from tests.edge_server.harness import Publisher, health, metrics_text, spawn_edge, status, wait_status
from iomt.local_broker import Mosquitto
from iomt.supervisor import stop

pytestmark = pytest.mark.integration


def _forged_frames() -> dict[str, list[tuple[str, bytes]]]:
    """Bad payloads on a registered device's topics, keyed by the reason the edge must give."""
    topic = b.topic("w-1", "ecg")
    ok = np.sin(np.arange(250, dtype=np.float32))[:, None]
    nan = ok.copy()
    nan[3, 0], nan[7, 0] = math.nan, math.inf
    code = DTYPES["float32"][0]
    good = b.frame("w-1", "ecg", 999)[1]
    return {
        "bad_magic": [(topic, b"\x00" * 64)],
        "truncated": [(topic, good[:20])],
        "bad_checksum": [(topic, good[:100] + bytes([good[100] ^ 1]) + good[101:])],
        "wrong_sample_count": [(topic, pack_raw("w-1", "ecg", 500, b.T0, 250.0, 1, code, 300, ok.tobytes()))],
        "non_finite": [(topic, pack_raw("w-1", "ecg", 501, b.T0, 250.0, 1, code, 250, nan.tobytes()))],
        "bad_version": [(topic, pack_raw("w-1", "ecg", 502, b.T0, 250.0, 1, code, 250, ok.tobytes(), version=9)),
                        (b.topic("nt-1", "note", "notes"),
                         b'{"v":2,"patient_id":"p1","note_id":"n9","text":"x","ts":1.0}')],
        "oversized": [(topic, b"IMSF" + b"\x01" * MAX_PAYLOAD)],
        "bad_json": [(b.topic("nt-1", "note", "notes"), b'{"v":1,"patient_id":"p1",'),
                     (b.topic("ehr-1", "record", "ehr"), b"\xff\xfe not json")],
        "unknown_device": [b.frame("w-404", "ecg", 0), b.note("nt-404", "p1", "n-x")],
        "unregistered_stream": [b.frame("w-2", "ppg", 0)],  # w-2 registered ecg only
        "invalid": [(b.topic("nt-1", "note", "notes"), b'{"v":1,"patient_id":"p1","note_id":"n9"}')],
        "bad_fhir": [(b.topic("ehr-1", "record", "ehr"), b'{"resourceType":"Patient"}')],
    }


def test_every_bad_input_is_rejected_with_reason_and_valid_neighbours_are_stored(mosquitto, tmp_path):
    data = tmp_path / "data"
    edge, port = spawn_edge(mosquitto, data, tmp_path / "edge.log")
    pub = Publisher(mosquitto)
    try:
        pub.publish([b.registration("w-1", "p1"), b.registration("nt-1", "ward", "notes"),
                     b.registration("ehr-1", "ward", "ehr"), b.registration("w-2", "p2", streams={"ecg": 250.0})],
                    retain=True)
        bad = _forged_frames()
        stream = []
        seq = 0
        for reason, msgs in bad.items():  # valid, bad, valid, bad, ...: each bad one has valid neighbours
            for msg in msgs:
                stream += [b.frame("w-1", "ecg", seq), msg, b.frame("w-1", "acc", seq)]
                seq += 1
        stream += [b.note("nt-1", "p1", "n-ok"), b.ehr("ehr-1", "p1")]
        sent = pub.publish(stream)
        n_bad = sum(len(v) for v in bad.values())

        st = wait_status(data, lambda s: s["received"] >= sent + 4)

        assert st["rejected"] == {reason: len(msgs) for reason, msgs in bad.items()}
        assert st["stored"]["by_stream"] == {"ecg": seq, "acc": seq, "note": 1, "record": 1}
        assert st["stored"]["total"] == sent - n_bad and st["duplicates"] == 0
        assert edge.poll() is None and health(port)["ok"]  # still running, still subscribed
        text = metrics_text(port)
        assert 'iomt_edge_rejected_total{reason="non_finite"} 1.0' in text
        assert 'iomt_edge_rejected_total{reason="unknown_device"} 2.0' in text
        assert 'iomt_edge_rejected_total{reason="unregistered_stream"} 1.0' in text
        assert f'iomt_edge_stored_total{{stream="ecg"}} {float(seq)}' in text
    finally:
        pub.close()
        assert stop(edge) == 0
    log = (tmp_path / "edge.log").read_text()
    assert log.count("WARNING edge_server.ingest.ingestor: rejected") == n_bad
    assert max(len(line) for line in log.splitlines()) < 1000  # payloads clipped, even the 4 MiB one
    assert "Traceback" not in log


def _stored_seqs(data, stream="ecg") -> list[int]:
    from edge_server.ingest.sqlite_store import SqliteStore
    with SqliteStore(data) as store:
        return [f.seq for f in store.frames("p1") if f.stream == stream]


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_kill_9_mid_stream_loses_nothing_and_stores_nothing_twice(mosquitto, tmp_path, version):
    data, n = tmp_path / "data", 3000
    # Long batches make it near certain the kill lands on delivered but uncommitted messages.
    edge, _ = spawn_edge(mosquitto, data, tmp_path / "edge1.log", "h1", "--batch-ms", "400", "--batch-max", "5000",
                         "--mqtt-version", version)
    pub = Publisher(mosquitto)
    pub.publish([b.registration("w-1", "p1")], retain=True)
    frames = [b.frame("w-1", "ecg", i) for i in range(n)]

    def publish():
        for i in range(0, n, 100):
            pub.publish(frames[i:i + 100])
            time.sleep(0.02)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        wait_status(data, lambda s: s["stored"]["total"] >= 300)
        stop(edge, signal.SIGKILL)
        assert edge.returncode == -signal.SIGKILL
        at_kill = status(data)["stored"]["total"]
        time.sleep(0.5)  # the broker queues for the persistent session meanwhile
        edge, port = spawn_edge(mosquitto, data, tmp_path / "edge2.log", "h1", "--mqtt-version", version)
        publisher.join(60)
        st = wait_status(data, lambda s: s["stored"]["total"] >= n)
    finally:
        publisher.join(60)
        pub.close()
        stop(edge)

    assert 0 < at_kill < n
    assert _stored_seqs(data) == list(range(n))
    assert st["stored"]["by_stream"] == {"ecg": n} and st["rejected"] == {}
    # Every committed delivery was a frame stored once, a redelivered copy, or the retained
    # registration (sent again on the second subscribe).
    assert st["received"] - st["duplicates"] - n in (1, 2)


def test_broker_restart_mid_stream_agent_drains_buffer_edge_gets_everything(tmp_path):
    from device_agent.agent import DeviceAgent
    from device_agent.settings import AgentSettings
    from protocols.messages import SignalFrame

    broker = Mosquitto(tmp_path, persistence=True).start()
    data, n = tmp_path / "data", 600
    edge, port = spawn_edge(broker, data, tmp_path / "edge.log")
    settings = AgentSettings(broker=broker.url, hospital="h1", device_id="w-1", patient_id="p1",
                             streams={"ecg": 250.0, "acc": 32.0}, buffer_path=tmp_path / "agent.sqlite3")
    try:
        with DeviceAgent(settings) as agent:
            assert agent.wait_connected(30)
            for i in range(n):
                if i == n // 3:
                    broker.stop()  # mid-stream; the agent buffers on disk meanwhile
                if i == n // 2:
                    assert agent.buffered > 0
                    broker.start()
                for stream, rate in (("ecg", 250.0), ("acc", 32.0)):
                    _, payload = b.frame("w-1", stream, i, rate=rate)
                    agent.publish_raw(b.topic("w-1", stream), payload)
                time.sleep(0.005)
            assert agent.flush(60)
            stats = dict(agent.stats)
        st = wait_status(data, lambda s: s["stored"]["total"] >= 2 * n, timeout=90)
        assert health(port)["ok"]
        reconnects = metrics_text(port)
    finally:
        stop(edge)
        broker.stop()

    assert st["stored"]["by_stream"] == {"ecg": n, "acc": n}, (st, stats)
    assert _stored_seqs(data, "ecg") == list(range(n)) and _stored_seqs(data, "acc") == list(range(n))
    assert st["rejected"] == {}
    assert "iomt_edge_reconnects_total 1.0" in reconnects  # the edge, too, came back on its own
    assert "session present: True" in (tmp_path / "edge.log").read_text()  # ... to its persisted session
    assert stats.get("dropped_queue_full", 0) == 0


def test_a_loop_failure_outside_the_store_exits_5_and_is_not_called_a_store_failure(mosquitto, tmp_path, caplog):
    """Only a failed commit is a store failure (3); anything else the loop raises is 5, with its cause.

    The fault is injected in-process into paho's housekeeping call (no real part fails
    that way on demand); broker, store and loop are the real ones.
    """
    import logging

    from edge_server.ingest.daemon import EXIT_INTERNAL, EdgeDaemon
    from edge_server.ingest.settings import EdgeSettings

    daemon = EdgeDaemon(EdgeSettings(hospital="h1", broker=mosquitto.url, data_dir=tmp_path / "data",
                                     preprocess_interval_s=0))
    make_client = daemon._make_client

    def failing_client():
        client = make_client()

        def loop_misc():
            raise RuntimeError("paho bookkeeping broke")
        client.loop_misc = loop_misc
        return client

    daemon._make_client = failing_client
    with caplog.at_level(logging.ERROR, logger="edge_server.ingest.daemon"):
        assert daemon.run() == EXIT_INTERNAL == 5
    assert "paho bookkeeping broke" in caplog.text and "store failed" not in caplog.text


def test_store_failure_exits_3_and_the_failed_batch_is_redelivered(mosquitto, tmp_path):
    """A commit that fails ends the daemon with 3 before any of the batch is acknowledged."""
    import sqlite3

    data = tmp_path / "data"
    edge, _ = spawn_edge(mosquitto, data, tmp_path / "edge1.log")
    pub = Publisher(mosquitto)
    try:
        pub.publish([b.registration("w-1", "p1")], retain=True)
        pub.publish([b.frame("w-1", "ecg", i) for i in range(5)])
        wait_status(data, lambda s: s["stored"]["total"] >= 5)
        with sqlite3.connect(data / "edge.sqlite3") as con:  # the disk "fails" on the next frame
            con.execute("CREATE TRIGGER fail BEFORE INSERT ON frames BEGIN SELECT RAISE(ABORT, 'disk gone'); END")
        pub.publish([b.frame("w-1", "ecg", i) for i in range(5, 10)])
        assert edge.wait(30) == 3
        assert _stored_seqs(data) == list(range(5))
        with sqlite3.connect(data / "edge.sqlite3") as con:  # the disk is back
            con.execute("DROP TRIGGER fail")
        edge, _ = spawn_edge(mosquitto, data, tmp_path / "edge2.log")
        wait_status(data, lambda s: s["stored"]["total"] >= 10)
    finally:
        pub.close()
        stop(edge)

    assert _stored_seqs(data) == list(range(10))  # nothing of the failed batch was lost
    assert "store failed" in (tmp_path / "edge1.log").read_text()


def test_broker_refusing_the_connection_exits_4(tmp_path):
    from iomt.supervisor import spawn_iomt

    broker = Mosquitto(tmp_path)
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    broker.start()
    try:
        codes = {}
        for version in ("5", "3.1.1"):
            log = tmp_path / f"edge-{version}.log"
            edge = spawn_iomt("edge", "run", "--hospital", "h1", "--broker", broker.url, "--data-dir",
                              str(tmp_path / "data"), "--mqtt-version", version, "--preprocess-interval", "0", log=log)
            try:
                codes[version] = edge.wait(30)
            finally:
                stop(edge)
            assert "broker refused the connection" in log.read_text()
    finally:
        broker.stop()

    assert codes == {"5": 4, "3.1.1": 4}
