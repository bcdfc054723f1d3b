"""Validation rules of the ingestor, delivery by delivery (no broker needed)."""
from __future__ import annotations

import logging

import pytest

from edge_server.ingest.ingestor import REJECTED_HEAD, Ingestor
from edge_server.ingest.store import Batch
from simulators import payloads as b


def _handle(ing: Ingestor, batch: Batch, msg: tuple[str, bytes]):
    return ing.handle(msg[0], msg[1], batch, 123.0)


def test_registered_device_frames_become_rows_with_its_patient():
    ing, batch = Ingestor("h1"), Batch()

    outcomes = [_handle(ing, batch, m) for m in (b.registration("w-1", "p7"), b.frame("w-1", "ecg", 0),
                                                 b.frame("w-1", "acc", 0))]

    assert [o.accepted for o in outcomes] == [True, True, True]
    assert [(f.stream, f.seq, f.patient_id, f.channels) for f in batch.frames] == [("ecg", 0, "p7", 1),
                                                                                   ("acc", 0, "p7", 3)]
    assert batch.frames[0].payload == b.frame("w-1", "ecg", 0)[1]  # stored exactly as received
    assert [d.device_id for d in batch.devices] == ["w-1"] and batch.received == 3


def test_documents_get_their_natural_ids():
    ing, batch = Ingestor("h1"), Batch()
    for reg in (b.registration("cr-1", "ward", "imaging"), b.registration("ehr-1", "ward", "ehr"),
                b.registration("nt-1", "ward", "notes")):
        _handle(ing, batch, reg)

    for m in (b.study("cr-1", "p1", "1.2.840.99.1"), b.ehr("ehr-1", "p1"), b.note("nt-1", "p1", "note-1")):
        assert _handle(ing, batch, m).accepted

    kinds = {d.kind: d for d in batch.documents}
    assert kinds["note"].natural_id == "note-1" and kinds["note"].patient_id == "p1"
    assert kinds["ehr"].natural_id.startswith("sha256:")
    assert kinds["image"].natural_id and kinds["image"].stream == "study"


def test_unknown_device_and_known_devices_from_store(caplog):
    ing, batch = Ingestor("h1"), Batch()

    with caplog.at_level(logging.WARNING, logger="edge_server.ingest.ingestor"):
        out = _handle(ing, batch, b.frame("w-2", "ecg", 0))

    assert not out.accepted and out.reason == "unknown_device"
    assert batch.rejections[0].device_id == "w-2" and batch.rejections[0].reason == "unknown_device"
    assert "unknown_device" in caplog.text and "w-2" in caplog.text
    # A device registered in an earlier run (loaded from the store) is known at once.
    ing2 = Ingestor("h1", {"w-2": _registered("w-2")})
    assert _handle(ing2, Batch(), b.frame("w-2", "ecg", 0)).accepted


def _registered(device_id):
    ing, batch = Ingestor("h1"), Batch()
    _handle(ing, batch, b.registration(device_id, "p1"))
    return batch.devices[0]


def test_every_bad_payload_is_a_rejection_with_its_reason(caplog):
    ing, batch = Ingestor("h1", max_payload=64 * 1024), Batch()
    _handle(ing, batch, b.registration("w-1", "p1"))
    _handle(ing, batch, b.registration("nt-1", "p1", "notes"))  # the sender is checked before the payload
    topic, good = b.frame("w-1", "ecg", 1)
    bad = {
        "bad_magic": (topic, b"not a frame at all"),
        "bad_checksum": (topic, good[:-1] + bytes([good[-1] ^ 0xFF])),
        "oversized": (topic, b"\0" * (64 * 1024 + 1)),
        "truncated": (topic, b""),
        "bad_json": (b.topic("nt-1", "note", "notes"), b"{not json"),
        "bad_topic": ("iomt/h1/toaster/t-1/ecg", good),
        "wrong_hospital": (b.topic("w-1", "ecg", hospital="h2"), good),
        "topic_mismatch": (b.topic("w-1", "ppg"), good),
    }

    with caplog.at_level(logging.WARNING, logger="edge_server.ingest.ingestor"):
        reasons = {name: _handle(ing, batch, msg).reason for name, msg in bad.items()}

    assert reasons == {name: name for name in bad}
    assert sorted(r.reason for r in batch.rejections) == sorted(bad)
    assert all(len(r.payload_head) <= REJECTED_HEAD for r in batch.rejections)
    assert max(len(line) for line in caplog.text.splitlines()) < 600  # payloads are clipped
    assert _handle(ing, batch, (topic, good)).accepted  # and the ingestor carries on


@pytest.mark.integration
def test_daemon_refuses_bad_config_with_exit_code_2(tmp_path):
    from edge_server.ingest.sqlite_store import SqliteStore
    from iomt.supervisor import run_iomt

    with SqliteStore(tmp_path / "other") as store:
        store.set_meta("hospital", "h2")

    foreign = run_iomt("edge", "run", "--hospital", "h1", "--data-dir", str(tmp_path / "other"), check=False,
                       timeout=60)
    bad_url = run_iomt("edge", "run", "--hospital", "h1", "--data-dir", str(tmp_path / "d"),
                       "--broker", "http://x", check=False, timeout=60)

    assert foreign.returncode == 2 and "holds hospital 'h2'" in foreign.stderr
    assert bad_url.returncode == 2 and "broker" in bad_url.stderr


def test_frame_on_a_stream_its_device_did_not_register_is_rejected(caplog):
    ing, batch = Ingestor("h1"), Batch()
    _handle(ing, batch, b.registration("w-1", "p1", streams={"ecg": 250.0}))

    with caplog.at_level(logging.WARNING, logger="edge_server.ingest.ingestor"):
        ppg = _handle(ing, batch, b.frame("w-1", "ppg", 0))
    ecg = _handle(ing, batch, b.frame("w-1", "ecg", 0))

    assert not ppg.accepted and ppg.reason == "unregistered_stream"
    assert [(r.reason, r.device_id) for r in batch.rejections] == [("unregistered_stream", "w-1")]
    assert "unregistered_stream" in caplog.text and "ppg" in caplog.text
    assert ecg.accepted and [(f.stream, f.seq) for f in batch.frames] == [("ecg", 0)]


def test_frame_rows_carry_the_decoded_frame_fields_and_exact_bytes():
    from protocols.frames import decode_frame

    ing, batch = Ingestor("h1"), Batch()
    _handle(ing, batch, b.registration("w-1", "p7"))
    msgs = [b.frame("w-1", stream, seq) for stream in ("ecg", "acc", "eda") for seq in (0, 5)]
    outcomes = [_handle(ing, batch, m) for m in msgs]

    assert [o.stream for o in outcomes] == ["ecg", "ecg", "acc", "acc", "eda", "eda"]
    for (_, payload), row in zip(msgs, batch.frames, strict=True):
        f = decode_frame(payload)
        assert row == (f.device_id, f.stream, f.seq, "p7", f.start_ts, f.sample_rate, f.n_samples, f.channels,
                       123.0, payload)


def test_finiteness_check_is_exact_for_huge_finite_samples():
    import numpy as np

    from protocols.frames import DTYPES, pack_raw

    ing, batch = Ingestor("h1"), Batch()
    _handle(ing, batch, b.registration("w-1", "p1"))
    code = DTYPES["float32"][0]
    huge = np.full(250, 3e38, dtype="<f4")  # finite, but their squares overflow float32
    bad = huge.copy()
    bad[100] = np.inf
    topic = b.topic("w-1", "ecg")
    ok = _handle(ing, batch, (topic, pack_raw("w-1", "ecg", 1, b.T0, 250.0, 1, code, 250, huge.tobytes())))
    inf = _handle(ing, batch, (topic, pack_raw("w-1", "ecg", 2, b.T0, 250.0, 1, code, 250, bad.tobytes())))
    bad[100] = np.nan
    nan = _handle(ing, batch, (topic, pack_raw("w-1", "ecg", 3, b.T0, 250.0, 1, code, 250, bad.tobytes())))

    assert ok.accepted and (inf.reason, nan.reason) == ("non_finite", "non_finite")
