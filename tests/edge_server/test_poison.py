"""No payload's content stops ingest, and no unknown sender's payload is decoded (issue 11, points 1 and 7).

Against a real Mosquitto and a real `iomt edge run`: messages whose fields the store cannot
hold (a frame ``seq`` of 2**63 and more, text with a lone UTF-16 surrogate) are rejected
with a reason while the valid messages of the same batch are stored and acknowledged; a
deflate-bomb DICOM from an unregistered device is refused before it is inflated, and one
from a registered device is refused without inflating it past the bound.
"""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from protocols.frames import DTYPES, pack_raw
from simulators import payloads as b
from tests.edge_server.harness import Publisher, health, spawn_edge, wait_status
from iomt.supervisor import stop

pytestmark = pytest.mark.integration


def _huge_seq(seq: int) -> bytes:
    samples = np.sin(np.arange(250, dtype=np.float32))
    return pack_raw("w-1", "ecg", seq, b.T0, 250.0, 1, DTYPES["float32"][0], 250, samples.tobytes())


def _with_surrogate(msg: tuple[str, bytes], key: str) -> tuple[str, bytes]:
    """``msg`` with the JSON string at ``key`` replaced by a lone surrogate (escaped, as JSON allows)."""
    topic, payload = msg
    body = json.loads(payload)
    body[key] = "\ud800"
    return topic, json.dumps(body).encode()  # ensure_ascii: the text "\ud800" on the wire


def _rejected_heads(data) -> dict[str, list[bytes]]:
    with sqlite3.connect(data / "edge.sqlite3") as con:
        rows = con.execute("SELECT reason, payload_head FROM rejections ORDER BY id").fetchall()
    out: dict[str, list[bytes]] = {}
    for reason, head in rows:
        out.setdefault(reason, []).append(head)
    return out


def test_unstorable_fields_are_rejected_and_the_rest_of_the_batch_is_stored(mosquitto, tmp_path):
    data = tmp_path / "data"
    # Long batches: the poison messages share their commit with valid ones.
    edge, port = spawn_edge(mosquitto, data, tmp_path / "edge.log", "h1", "--batch-ms", "300")
    pub = Publisher(mosquitto)
    poison = {
        "out_of_range": [("iomt/h1/wearable/w-1/ecg", _huge_seq(2**63)),
                         ("iomt/h1/wearable/w-1/ecg", _huge_seq(2**64 - 1))],
        "bad_text": [_with_surrogate(b.ehr("ehr-1", "p1"), "id"),
                     _with_surrogate(b.note("nt-1", "p1", "n-2"), "text")],
    }
    try:
        pub.publish([b.registration("w-1", "p1"), b.registration("ehr-1", "ward", "ehr"),
                     b.registration("nt-1", "ward", "notes")], retain=True)
        bad = [m for msgs in poison.values() for m in msgs]
        stream = []
        for i, msg in enumerate(bad):
            stream += [b.frame("w-1", "ecg", i), msg]
        stream += [b.note("nt-1", "p1", "n-1"), b.ehr("ehr-1", "p2"), b.frame("w-1", "ecg", 2**63 - 1)]
        sent = pub.publish(stream)

        st = wait_status(data, lambda s: s["received"] >= sent + 3 or edge.poll() is not None)

        assert edge.poll() is None and health(port)["ok"], (tmp_path / "edge.log").read_text()[-3000:]
        assert st["rejected"] == {reason: len(msgs) for reason, msgs in poison.items()}
        assert st["stored"]["by_stream"] == {"ecg": len(bad) + 1, "note": 1, "record": 1}
    finally:
        pub.close()
        code = stop(edge)
    assert code == 0
    heads = _rejected_heads(data)
    assert heads["out_of_range"] == [p[:256] for _, p in poison["out_of_range"]]  # first bytes kept
    assert heads["bad_text"] == [p[:256] for _, p in poison["bad_text"]]
    log = (tmp_path / "edge.log").read_text()
    assert "Traceback" not in log and "store failed" not in log

    # Everything was acknowledged: a restarted daemon gets nothing again but the retained registrations.
    edge, port = spawn_edge(mosquitto, data, tmp_path / "edge2.log")
    try:
        st = wait_status(data, lambda s: s["received"] >= sent + 6)
    finally:
        assert stop(edge) == 0
    assert st["received"] == sent + 6 and st["duplicates"] == 0


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_deflate_bomb_is_refused_before_it_is_inflated(mosquitto, tmp_path):
    data = tmp_path / "data"
    edge, port = spawn_edge(mosquitto, data, tmp_path / "edge.log")
    pub = Publisher(mosquitto)
    # 512 MiB of pixels in about 0.5 MB on the wire.
    unknown = b.deflated_study("cr-404", "p1", "1.2.840.99.404", 16384, 16384)
    registered = b.deflated_study("cr-1", "p1", "1.2.840.99.405", 16384, 16384)
    try:
        pub.publish([b.registration("cr-1", "p1", "imaging"), b.registration("w-1", "p1")], retain=True)
        pub.publish([b.study("cr-1", "p1", "1.2.840.99.1")])  # pydicom is loaded before the baseline
        wait_status(data, lambda s: s["stored"]["total"] >= 1)
        baseline = _peak_rss_mb(edge.pid)

        sent = pub.publish([unknown, b.frame("w-1", "ecg", 0), registered, b.study("cr-1", "p1", "1.2.840.99.2")])
        st = wait_status(data, lambda s: s["received"] >= sent + 3 or edge.poll() is not None)
        grown = _peak_rss_mb(edge.pid) - baseline
        assert edge.poll() is None and health(port)["ok"]
    finally:
        pub.close()
        assert stop(edge) == 0

    assert st["rejected"] == {"unknown_device": 1, "oversized": 1}
    assert st["stored"]["by_stream"] == {"study": 2, "ecg": 1}
    assert grown < 150, f"the edge's peak memory grew by {grown:.0f} MB"
