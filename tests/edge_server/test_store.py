"""Contract of every Store implementation: atomic commits, deduplication, status counts."""
from __future__ import annotations

import pytest

from edge_server.ingest.sqlite_store import SqliteStore
from edge_server.ingest.store import Batch, DeviceRow, DocumentRow, FrameRow, PresenceRow, RejectionRow


def _frame(device="w-1", stream="ecg", seq=0, patient="p1", t=100.0):
    return FrameRow(device, stream, seq, patient, 1.7e9 + seq, 250.0, 250, 1, t, b"raw-%d" % seq)


def _device(device="w-1", patient="p1", cls="wearable"):
    return DeviceRow(device, cls, patient, ("ecg", "ppg"), 99.0, b"{}")


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    s = SqliteStore(tmp_path / "d" if request.param == "file" else ":memory:")
    yield s
    s.close()


class TestStoreContract:
    def test_frames_are_stored_once_per_device_stream_seq(self, store):
        store.commit(Batch(devices=[_device()], received=1))
        first = store.commit(Batch(frames=[_frame(seq=i) for i in range(5)], received=5))
        again = store.commit(Batch(frames=[_frame(seq=3), _frame(seq=4), _frame(seq=5),
                                           _frame(stream="ppg", seq=3)], received=4))

        assert first.stored == {"ecg": 5} and first.duplicates == 0
        assert again.stored == {"ecg": 1, "ppg": 1} and again.duplicates == 2
        status = store.status()
        assert status["stored"]["by_stream"] == {"ecg": 6, "ppg": 1}
        assert status["stored"]["by_device"] == {"w-1": 7}
        assert status["duplicates"] == 2 and status["received"] == 10
        assert [f.seq for f in store.frames("p1") if f.stream == "ecg"] == [0, 1, 2, 3, 4, 5]

    def test_documents_dedupe_by_kind_and_natural_id(self, store):
        docs = [DocumentRow("note", "n1", "nt-1", "note", "p1", 1.0, b"a"),
                DocumentRow("note", "n1", "nt-1", "note", "p1", 2.0, b"a"),
                DocumentRow("ehr", "n1", "ehr-1", "record", "p1", 3.0, b"b"),
                DocumentRow("image", "1.2.3", "cr-1", "study", "p2", 4.0, b"c")]
        result = store.commit(Batch(documents=docs, received=4))

        assert result.stored == {"note": 1, "record": 1, "study": 1} and result.duplicates == 1
        assert store.status()["stored"]["by_modality"] == {"ehr": 1, "image": 1, "text": 1}
        assert [d.payload for d in store.documents("p1")] == [b"a", b"b"]
        assert [d.kind for d in store.documents("p1", "ehr")] == ["ehr"]
        assert store.patients() == ["p1", "p2"]

    def test_rejections_counted_by_reason_and_kept(self, store):
        rej = [RejectionRow("bad_checksum", "iomt/h1/wearable/w-1/ecg", "w-1", "crc", 9, 1.0, b"x" * 9),
               RejectionRow("unknown_device", "iomt/h1/wearable/w-9/ecg", "w-9", "", 3, 2.0, b"abc"),
               RejectionRow("bad_checksum", "iomt/h1/wearable/w-1/ecg", "w-1", "crc", 9, 3.0, b"y")]
        store.commit(Batch(rejections=rej, received=3))

        status = store.status()
        assert status["rejected"] == {"bad_checksum": 2, "unknown_device": 1}
        assert status["rejected_total"] == 3 and status["stored"]["total"] == 0

    def test_registration_last_wins_and_last_seen_tracks_newest(self, store):
        store.commit(Batch(devices=[_device(patient="p1")], received=1))
        store.commit(Batch(devices=[_device(patient="p2")], frames=[_frame(t=50.0), _frame(seq=1, t=70.0)],
                           presence=[PresenceRow("w-1", True, 60.0)], received=4))

        assert store.devices()["w-1"].patient_id == "p2"
        status = store.status()
        assert status["last_seen"] == {"w-1": 70.0}
        assert status["devices"]["w-1"] == {"class": "wearable", "patient_id": "p2", "online": True}

    def test_a_row_the_schema_refuses_is_rejected_and_the_rest_committed(self, store):
        bad = Batch(frames=[_frame(seq=1), _frame(seq=2)], received=3)
        bad.frames.append(FrameRow("w-1", "ecg", 3, "p1", 1.0, 250.0, 1, 1, 1.0, None))  # NOT NULL payload

        result = store.commit(bad)

        assert result.stored == {"ecg": 2} and [row for row, _ in result.refused] == [bad.frames[2]]
        status = store.status()
        assert status["rejected"] == {"unstorable": 1} and status["received"] == 3
        assert "NOT NULL" in result.refused[0][1].detail and result.refused[0][1].payload_head == b""

    def test_record_cache_follows_patient_version(self, store):
        store.commit(Batch(frames=[_frame(seq=0)], received=1))
        v1 = store.patient_version("p1")
        store.cache_record("p1", v1, b"blob")
        store.commit(Batch(frames=[_frame(seq=1)], received=1))

        assert store.cached_record("p1") == (v1, b"blob")
        assert store.patient_version("p1") != v1

    def test_meta_round_trip(self, store):
        store.set_meta("hospital", "h7")
        assert store.get_meta("hospital") == "h7" and store.get_meta("nope") is None


def test_sqlite_store_survives_reopen_and_reads_readonly(tmp_path):
    with SqliteStore(tmp_path) as s:
        s.commit(Batch(frames=[_frame(seq=i) for i in range(3)], received=3))
    with SqliteStore(tmp_path, readonly=True) as ro:
        assert ro.status()["stored"]["by_stream"] == {"ecg": 3}
    with pytest.raises(FileNotFoundError):
        SqliteStore(tmp_path / "nothing", readonly=True)


class TestRowsTheStoreCannotHold:
    """One row's content never fails a commit; the store failing still does (SqliteStore)."""

    def test_refused_rows_become_unstorable_rejections_and_the_rest_is_committed(self, store):
        store.set_meta("hospital", "h1")
        good = [_frame(seq=0), _frame(seq=1), DocumentRow("note", "n1", "nt-1", "note", "p1", 1.0, b"ok")]
        bad = [_frame(seq=2**63), _frame(seq=5)._replace(start_ts=float("nan")),
               DocumentRow("ehr", "\ud800", "ehr-1", "record", "p1", 2.0, b"x" * 300),
               DeviceRow("w-\udfff", "wearable", "p1", ("ecg",), 3.0, b"{}")]
        rej = RejectionRow("bad_checksum", "iomt/h1/wearable/w-1/ecg", "w-1", "crc \ud800", 9, 1.0, b"x")
        batch = Batch(frames=[good[0], bad[0], good[1], bad[1]], documents=[bad[2], good[2]],
                      devices=[_device(), bad[3]], rejections=[rej], received=9)

        result = store.commit(batch)

        assert result.stored == {"ecg": 2, "note": 1} and result.duplicates == 0
        assert [row for row, _ in result.refused] == [bad[3], bad[0], bad[1], bad[2]]
        status = store.status()
        assert status["rejected"] == {"bad_checksum": 1, "unstorable": 4} and status["received"] == 9
        assert list(status["devices"]) == ["w-1"]
        reasons = {r.topic: r for _, r in result.refused}
        assert reasons["iomt/h1/ehr/ehr-1/record"].payload_head == b"x" * 256  # first bytes kept
        assert "OverflowError" in reasons["iomt/h1/wearable/w-1/ecg"].detail or \
            "IntegrityError" in reasons["iomt/h1/wearable/w-1/ecg"].detail
        details = sorted(r.detail.split(":")[0] for _, r in result.refused)
        assert details == ["IntegrityError", "OverflowError", "UnicodeEncodeError", "UnicodeEncodeError"]

    def test_a_store_failure_raises_and_applies_nothing(self, store):
        store._db.execute("CREATE TRIGGER fail BEFORE INSERT ON frames BEGIN SELECT RAISE(ABORT, 'disk gone'); END")
        import sqlite3

        with pytest.raises(sqlite3.IntegrityError, match="disk gone"):
            store.commit(Batch(frames=[_frame(seq=0), _frame(seq=2**63)],
                               documents=[DocumentRow("note", "n1", "nt-1", "note", "p1", 1.0, b"ok")], received=3))

        assert store.status()["stored"]["total"] == 0 and store.status()["received"] == 0
