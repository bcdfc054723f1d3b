"""Every decoded field fits what a store can hold, and no payload expands without bound."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from protocols.errors import ProtocolError
from protocols.fhir import build_bundle
from protocols.frames import DTYPES, check_frame, pack_raw
from protocols.imaging import MAX_DECODED_BYTES
from protocols.messages import ClinicalNote, DeviceRegistration, SignalFrame, from_wire, to_wire
from protocols.ranges import MAX_INT, check_json_text, printable
from protocols.topics import Topic
from simulators import payloads as b

ECG = Topic("h1", "wearable", "w-1", "ecg")
STUDY = Topic("h1", "imaging", "cr-1", "study")
RECORD = Topic("h1", "ehr", "ehr-1", "record")
NOTE = Topic("h1", "notes", "nt-1", "note")
REGISTRATION = Topic("h1", "wearable", "w-1", "registration")


def expect(reason, topic, payload):
    with pytest.raises(ProtocolError) as info:
        from_wire(topic, payload)
    assert info.value.reason == reason, info.value
    return info.value


def _frame_bytes(seq: int) -> bytes:
    return pack_raw("w-1", "ecg", seq, 1.7e9, 250.0, 1, DTYPES["float32"][0], 4, bytes(16))


@pytest.mark.parametrize("seq", [2**63, 2**63 + 1, 2**64 - 1])
def test_frame_seq_past_the_signed_64_bit_range_is_out_of_range(seq):
    expect("out_of_range", ECG, _frame_bytes(seq))
    with pytest.raises(ProtocolError, match="out_of_range"):
        SignalFrame.build("w-1", "ecg", seq, 1.7e9, 250.0, np.zeros(4))


def test_frame_seq_bounds_that_fit_are_accepted():
    assert [check_frame(_frame_bytes(s)).seq for s in (0, MAX_INT)] == [0, 2**63 - 1]
    with pytest.raises(ProtocolError, match="out_of_range"):
        SignalFrame.build("w-1", "ecg", -1, 1.7e9, 250.0, np.zeros(4))


@pytest.mark.parametrize("raw", [b'"\\ud800"', b'"\\udfff x"', b'"\xed\xa0\x80"'])
def test_lone_surrogates_in_any_json_message_are_bad_text(raw):
    note = ClinicalNote(patient_id="p1", note_id="n1", text="TEXT", ts=1.0).model_dump_json().encode()
    reg = to_wire(DeviceRegistration(hospital="h1", device_id="w-1", device_class="wearable", patient_id="p1",
                                     streams={"ecg": 250.0}, model="MODEL"))
    bundle = build_bundle("p1", {"age": 60.0}, "cardiac", ts=1.0)
    bundle["id"] = "BID"
    ehr = json.dumps(bundle).encode()

    expect("bad_text", NOTE, note.replace(b'"TEXT"', raw))
    expect("bad_text", REGISTRATION, reg.replace(b'"MODEL"', raw))
    expect("bad_text", RECORD, ehr.replace(b'"BID"', raw))
    expect("bad_text", RECORD, ehr.replace(b'"resourceType"', raw, 1))  # keys too
    expect("bad_text", NOTE, "\ufeff".encode("utf-16-le") + note.replace(b'"TEXT"', raw).decode(
        "utf-8", "surrogatepass").encode("utf-16-le", "surrogatepass"))


def test_json_nested_past_the_stack_is_bad_json_and_nested_text_is_checked():
    expect("bad_json", NOTE, b"[" * 200_000)
    with pytest.raises(ProtocolError, match="bad_text"):
        check_json_text({"a": [[{"b": ["ok", {"c": "\ud800"}]}]]})
    assert printable("x\ud800y") == "x\\ud800y" and printable("fine é") == "fine é"


@pytest.mark.parametrize("bundle_id", ["", "has space", "x" * 65, 7, None])
def test_bundle_id_must_be_a_fhir_id(bundle_id):
    bundle = build_bundle("p1", {"age": 60.0}, "cardiac", ts=1.0)
    bundle["id"] = bundle_id
    expect("bad_fhir", RECORD, json.dumps(bundle).encode())


def test_fhir_values_and_timestamps_that_do_not_fit_are_bad_fhir():
    bundle = build_bundle("p1", {"age": 60.0}, "cardiac", ts=1.0)
    huge = json.dumps(bundle).replace('"value": 60.0', '"value": ' + "9" * 400).encode()
    expect("bad_fhir", RECORD, huge)  # a JSON integer no float64 holds
    bundle["timestamp"] = "yesterday"
    expect("bad_fhir", RECORD, json.dumps(bundle).encode())


def test_deflate_bomb_is_oversized_without_inflating_it():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, bomb = b.deflated_study("cr-1", "p1", "1.2.3", 16384, 16384)  # 512 MiB of pixels
    assert len(bomb) < 1024 * 1024
    err = expect("oversized", STUDY, bomb)
    assert "inflates past" in err.detail
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 150, grown_mb


def test_a_small_deflated_study_still_decodes():
    _, payload = b.deflated_study("cr-1", "p1", "1.2.3", 4096, 4096)  # 32 MiB of pixels: within bounds
    study = from_wire(STUDY, payload)
    assert study.pixels.shape == (4096, 4096) and study.study_uid == "1.2.3"


def test_pixel_data_larger_than_the_bound_is_refused_from_the_header():
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(b.study("cr-1", "p1", "1.2.3", size=4)[1]))
    ds.NumberOfFrames = MAX_DECODED_BYTES // 32 + 1  # 4x4 16-bit frames: 32 bytes each
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert "decodes to" in expect("oversized", STUDY, buf.getvalue()).detail
    ds.NumberOfFrames, ds.Rows, ds.Columns = 1, 65535, 65535  # US: the largest a header holds
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    expect("oversized", STUDY, buf.getvalue())


def test_dicom_uids_longer_than_dicom_allows_are_refused():
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(b.study("cr-1", "p1", "1.2.3", size=4)[1]))
    ds.SOPInstanceUID = "1." * 40
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    expect("bad_field", STUDY, buf.getvalue())
