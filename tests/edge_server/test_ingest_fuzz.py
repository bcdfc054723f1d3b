"""Fuzzing the whole ingest path, payload -> validation -> committed row (hypothesis).

Deliveries go through the daemon's own code in-process: ``EdgeDaemon._on_message`` (the
paho callback, given real ``MQTTMessage`` objects) and ``EdgeDaemon._flush`` (the commit to a
real SQLite store; acknowledgements are off, there is no broker). Each example mixes valid
messages of every kind, each with its own natural id, with mutated ones: flipped, cut or
extended bytes, random bytes, frames forged with boundary ``seq`` values, JSON fields
replaced by odd unicode (lone surrogates included), huge or non-finite numbers and deep
nesting, wrong topics, deflate bombs. The invariants:

* nothing raises out of the ingest step;
* every delivery is counted once, and is exactly one of: a new row, a duplicate of a row,
  a rejection with a reason (never ``internal_error``), or an accepted control message;
* every unmutated valid message is stored exactly once, byte for byte;
* every stored row decodes again through ``from_wire`` (what is committed is valid).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math

import numpy as np
import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from edge_server.ingest.daemon import EdgeDaemon
from edge_server.ingest.settings import EdgeSettings
from edge_server.ingest.sqlite_store import SqliteStore
from edge_server.ingest.store import Batch, FrameRow
from protocols.fhir import build_bundle
from protocols.frames import DTYPES, pack_raw
from protocols.messages import Presence, from_wire, to_wire
from protocols.topics import CONTROL_STREAMS, Topic
from simulators import payloads as b

REGISTRATIONS = [b.registration("w-1", "p1"), b.registration("cr-1", "p1", "imaging"),
                 b.registration("ehr-1", "p1", "ehr"), b.registration("nt-1", "p1", "notes")]
KINDS = ["frame", "study", "ehr", "note", "registration", "presence"]

#: JSON values that do not belong where they are put.
ODD_TEXT = st.text(st.characters(codec=None, categories=None), max_size=12)  # surrogates included
ODD_JSON = st.one_of(
    ODD_TEXT, st.sampled_from(["\ud800", "\udfff", "a\ud83d", "\x00", "\u202e", "\ufffe", "x" * 70]),
    st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([2**63, 2**64 - 1, -2**63 - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=3), st.dictionaries(ODD_TEXT, st.integers(), max_size=2),
    st.just("DEEP"))


@functools.cache  # the same bytes every time (a registration carries the time): hypothesis replays draws
def _valid(kind: str, i: int) -> tuple[str, bytes]:
    """The ``i``-th valid message of ``kind``; its natural id is unique to ``i``."""
    if kind == "frame":
        return b.frame("w-1", ("ecg", "acc", "eda")[i % 3], i, seconds=0.1)
    if kind == "study":
        return b.study("cr-1", "p1", f"1.2.840.99.{i}", size=4)
    if kind == "ehr":
        bundle = build_bundle("p1", {"age": 50.0 + i, "heart_rate": 80.0}, "cardiac", ts=b.T0)
        bundle["id"] = f"bundle-{i}"
        return b.topic("ehr-1", "record", "ehr"), json.dumps(bundle).encode()
    if kind == "note":
        return b.note("nt-1", "p1", f"n-{i}", text=f"note {i}: chest pain")
    if kind == "registration":
        return b.registration(f"w-{100 + i}", f"p{i}")
    return b.topic("w-1", "presence"), to_wire(Presence(device_id="w-1", online=bool(i % 2), ts=b.T0))


@functools.cache
def _bomb() -> bytes:
    return b.deflated_study("cr-1", "p1", "1.2.840.99.666", 8192, 8192)[1]  # 128 MiB in ~130 kB


def _replace_json(payload: bytes, data: st.DataObject) -> bytes:
    """Replace one value somewhere in the JSON document by an odd one."""
    doc = json.loads(payload)
    node, path = doc, []
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans(), "descend"):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))), "key")
        path.append((node, key))
        node = node[key]
    value = data.draw(ODD_JSON, "value")
    if value == "DEEP":
        return payload.replace(b"{", b"[" * 100_000 + b"{", 1)
    if not path:
        return json.dumps(value).encode()
    parent, key = path[-1]
    parent[key] = value
    return json.dumps(doc, allow_nan=True).encode()  # NaN/Infinity tokens are bad JSON, as sent


@st.composite
def deliveries(draw):
    """``[(topic, payload, kind, mutated)]``: the registrations, then valid and mutated messages."""
    out = [(t, p, "registration", False) for t, p in REGISTRATIONS]
    for i in range(draw(st.integers(1, 14), "n")):
        kind = draw(st.sampled_from(KINDS), "kind")
        topic, payload = _valid(kind, i)
        how = draw(st.sampled_from(["none", "none", "flip", "cut", "extend", "random", "seq", "json",
                                    "topic", "bomb", "empty"]), "mutation")
        if how == "flip" and payload:
            pos = draw(st.integers(0, len(payload) - 1), "pos")
            payload = payload[:pos] + bytes([payload[pos] ^ draw(st.integers(1, 255), "bits")]) + payload[pos + 1:]
        elif how == "cut":
            payload = payload[:draw(st.integers(0, max(0, len(payload) - 1)), "cut")]
        elif how == "extend":
            payload = payload + draw(st.binary(min_size=1, max_size=32), "tail")
        elif how == "random":
            payload = draw(st.binary(max_size=300), "bytes")
        elif how == "seq":
            seq = draw(st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]), "seq")
            samples = np.full(4, draw(st.sampled_from([0.5, math.nan, math.inf, 3e38]), "sample"), "<f4")
            topic = b.topic("w-1", "ecg")
            payload = pack_raw("w-1", "ecg", seq, b.T0, 250.0, 1, DTYPES["float32"][0], 4, samples.tobytes())
        elif how == "json" and kind in ("ehr", "note", "registration", "presence"):
            payload = _replace_json(payload, draw(st.data(), "data"))
        elif how == "topic":
            topic = draw(st.sampled_from([
                topic.replace("/h1/", "/h2/"), topic.replace("-1/", "-404/"), "iomt/h1/toaster/t-1/ecg",
                "iomt/h1/wearable/w-1/study", "iomt/h1", topic + "/extra", "iomt/h1/wearable/w\udcff/ecg"]), "topic")
        elif how == "bomb":
            topic, payload = draw(st.sampled_from([b.topic("cr-1", "study", "imaging"),
                                                   b.topic("cr-9", "study", "imaging")]), "bomb topic"), _bomb()
        elif how == "empty":
            payload = b""
        out.append((topic, payload, kind, how != "none"))
    return out


def _deliver(daemon: EdgeDaemon, topic: str, payload: bytes, mid: int) -> None:
    msg = mqtt.MQTTMessage(mid, topic.encode("utf-8", "surrogateescape"))
    msg.payload, msg.qos = payload, 0
    daemon._on_message(None, None, msg)


def _daemon(tmp_path) -> EdgeDaemon:
    return EdgeDaemon(EdgeSettings(hospital="h1", data_dir=tmp_path, preprocess_interval_s=0),
                      store=SqliteStore(":memory:"))


def _data_key(topic: str, payload: bytes):
    """The natural key of a data message the ingestor accepted."""
    msg = from_wire(Topic.parse(topic), payload)
    if msg.__class__.__name__ == "SignalFrame":
        return ("frame", msg.device_id, msg.stream, msg.seq)
    if msg.__class__.__name__ == "EhrRecord":  # Bundle.id, else the payload's hash (as the ingestor does)
        return ("ehr", msg.bundle.get("id") or hashlib.sha256(payload).hexdigest())
    return (msg.__class__.__name__, getattr(msg, "note_id", None) or msg.sop_instance_uid or msg.study_uid)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
@given(deliveries())
def test_every_delivery_becomes_one_row_or_one_reasoned_rejection(tmp_path, items):
    daemon = _daemon(tmp_path)
    outcomes = []
    handle = daemon.ingestor.handle
    daemon.ingestor.handle = lambda *a: outcomes.append(handle(*a)) or outcomes[-1]  # record, then pass on

    for mid, (topic, payload, _, _) in enumerate(items, 1):
        _deliver(daemon, topic, payload, mid)  # the paho callback: never raises
    daemon._flush(ack=False)  # the real commit: never raises for content

    store = daemon.store
    status = store.status()
    rejected = store._db.execute("SELECT reason, topic, size, payload_head FROM rejections").fetchall()
    assert status["received"] == len(items) == len(outcomes)
    assert len(rejected) == sum(not o.accepted for o in outcomes)  # the store refused nothing validation passed
    assert all(reason and reason not in ("internal_error", "unstorable") for reason, *_ in rejected)
    assert all(head == payload[:256] for (_, _, size, head), (_, payload, _, _) in
               zip(rejected, [it for it, o in zip(items, outcomes) if not o.accepted]))
    data = [(t, p) for (t, p, _, _), o in zip(items, outcomes) if o.accepted and o.stream not in CONTROL_STREAMS]
    keys = [_data_key(t, p) for t, p in data]
    assert status["stored"]["total"] == len(set(keys)) and status["duplicates"] == len(keys) - len(set(keys))

    frames = {(f.device_id, f.stream, f.seq): f.payload for f in store.frames("p1")}
    docs = [d.payload for d in store.documents("p1")]
    for topic, payload, kind, mutated in items:
        if not mutated and kind in ("frame", "study", "ehr", "note"):
            stored = frames.get(_data_key(topic, payload)[1:]) if kind == "frame" else \
                payload if docs.count(payload) == 1 else None
            assert stored == payload, f"valid {kind} not stored exactly once"
    for (device, stream, _), payload in frames.items():  # what is committed decodes again
        from_wire(Topic("h1", "wearable", device, stream), payload)
    for d in store.documents("p1"):
        from_wire(Topic("h1", {"image": "imaging", "ehr": "ehr", "note": "notes"}[d.kind], d.device_id, d.stream),
                  d.payload)
    store.close()


def test_a_row_the_store_refuses_is_rejected_and_its_batch_committed(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="edge_server.ingest.sqlite_store")
    """Past validation (here: rows put in the batch directly), the store still isolates the culprit."""
    daemon = _daemon(tmp_path)
    for mid, (topic, payload) in enumerate([*REGISTRATIONS, b.frame("w-1", "ecg", 0)], 1):
        _deliver(daemon, topic, payload, mid)
    good = daemon._batch.frames[0]
    daemon._batch.frames.append(FrameRow(*good[:2], 2**63, *good[3:]))
    daemon._batch.received += 1

    daemon._flush(ack=False)

    status = daemon.store.status()
    assert status["stored"]["by_stream"] == {"ecg": 1} and status["rejected"] == {"unstorable": 1}
    assert 'iomt_edge_rejected_total{reason="unstorable"} 1.0' in generate_latest(daemon.metrics.registry).decode()
    assert "store refused a row" in caplog.text
    assert isinstance(daemon._batch, Batch) and daemon._batch.received == 0
