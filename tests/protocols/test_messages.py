"""Wire round trips of every message and every reason a bad payload is refused."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from pydantic import ValidationError

from protocols.errors import ProtocolError
from protocols.fhir import build_bundle
from protocols.frames import DTYPES, FRAME_VERSION, MAX_PAYLOAD, pack_raw
from protocols.messages import (ClinicalNote, DeviceRegistration, EhrRecord, ImagingStudy, Presence,
                                SignalFrame, from_wire, stream_of, to_wire)
from protocols.schema import CONDITIONS, SIGNAL_STREAMS
from protocols.topics import Topic

ECG = Topic("h1", "wearable", "w-1", "ecg")
ACC = Topic("h1", "wearable", "w-1", "acc")
STUDY = Topic("h1", "imaging", "cr-1", "study")
RECORD = Topic("h1", "ehr", "ehr-1", "record")
NOTE = Topic("h1", "notes", "notes-1", "note")


def frame(stream="ecg", n=500, channels=1, dtype="float32", seq=7):
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(n, channels)) * (1000 if dtype == "int16" else 1)
    return SignalFrame.build("w-1", stream, seq, 1.7e9 + 0.25, 500.0 if stream == "ecg" else 32.0, samples, dtype)


def expect(reason, topic, payload):
    with pytest.raises(ProtocolError) as info:
        from_wire(topic, payload)
    assert info.value.reason == reason, info.value
    return info.value


# -- signal frames -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("stream", list(SIGNAL_STREAMS))
def test_frame_round_trip(stream, dtype):
    channels = SIGNAL_STREAMS[stream][0]
    f = frame(stream, n=37, channels=channels, dtype=dtype)
    g = from_wire(ECG.with_stream(stream), to_wire(f))
    assert isinstance(g, SignalFrame)
    assert (g.device_id, g.stream, g.seq, g.start_ts, g.sample_rate, g.channels, g.dtype) == (
        "w-1", stream, 7, 1.7e9 + 0.25, f.sample_rate, channels, dtype)
    assert g.samples.shape == (37, channels) and g.samples.dtype == DTYPES[dtype][1]
    np.testing.assert_array_equal(g.samples, f.samples)
    assert stream_of(g) == stream


def test_frame_timestamps_follow_rate():
    f = frame(n=4)
    np.testing.assert_allclose(f.timestamps() - f.start_ts, [0, 0.002, 0.004, 0.006], atol=1e-6)


def test_frame_rejects_bad_fields_on_construction():
    for bad, reason in [
        (dict(samples=np.array([[np.nan]], dtype="<f4")), "non_finite"),
        (dict(samples=np.array([[np.inf]], dtype="<f4")), "non_finite"),
        (dict(samples=np.zeros((0, 1), dtype="<f4")), "wrong_sample_count"),
        (dict(samples=np.zeros((3, 2), dtype="<f4")), "wrong_shape"),
        (dict(samples=np.zeros((3, 1), dtype="<f8")), "bad_dtype"),
        (dict(stream="xray"), "unknown_stream"),
        (dict(channels=2), "wrong_channels"),
        (dict(sample_rate=0.0), "bad_field"),
        (dict(device_id="a/b"), "bad_field"),
    ]:
        fields = dict(device_id="w-1", stream="ecg", seq=1, start_ts=0.0, sample_rate=250.0, channels=1,
                      dtype="float32", samples=np.zeros((3, 1), dtype="<f4"))
        fields.update(bad)
        with pytest.raises(ProtocolError) as info:
            SignalFrame(**fields)
        assert info.value.reason == reason


def test_frame_bad_wire_inputs_each_have_a_reason():
    good = to_wire(frame())
    data = frame().samples.tobytes()
    expect("truncated", ECG, good[:3])
    expect("truncated", ECG, good[:20])
    expect("bad_magic", ECG, b"XXXX" + good[4:])
    expect("bad_version", ECG, good[:4] + bytes([FRAME_VERSION + 1]) + good[5:])
    expect("bad_checksum", ECG, good[:-5] + bytes([good[-5] ^ 1]) + good[-4:])
    expect("bad_checksum", ECG, good[:-10])                      # cut mid-samples
    expect("wrong_sample_count", ECG, pack_raw("w-1", "ecg", 1, 0.0, 500.0, 1, 1, 501, data))
    expect("wrong_sample_count", ECG, pack_raw("w-1", "ecg", 1, 0.0, 500.0, 1, 1, 499, data))
    nan = np.full(4, np.nan, dtype="<f4").tobytes()
    expect("non_finite", ECG, pack_raw("w-1", "ecg", 1, 0.0, 500.0, 1, 1, 4, nan))
    inf = np.array([1, 2, np.inf, 4], dtype="<f4").tobytes()
    expect("non_finite", ECG, pack_raw("w-1", "ecg", 1, 0.0, 500.0, 1, 1, 4, inf))
    expect("bad_dtype", ECG, pack_raw("w-1", "ecg", 1, 0.0, 500.0, 1, 9, 4, bytes(16)))
    expect("wrong_channels", ECG, pack_raw("w-1", "ecg", 1, 0.0, 500.0, 2, 1, 2, bytes(16)))
    expect("bad_field", ECG, pack_raw("w-1", "ecg", 1, float("nan"), 500.0, 1, 1, 4, bytes(16)))
    # header claims ids longer than the frame, with a valid checksum
    body = struct.pack("<4sBQddHBIBB", b"IMSF", FRAME_VERSION, 1, 0.0, 500.0, 1, 1, 0, 200, 200) + b"w-1"
    expect("truncated", ECG, body + struct.pack("<I", zlib.crc32(body)))
    expect("oversized", ECG, good + bytes(MAX_PAYLOAD))
    expect("topic_mismatch", ECG.with_stream("ppg"), good)
    expect("topic_mismatch", Topic("h1", "wearable", "w-2", "ecg"), good)
    expect("truncated", ECG, b"")


def test_forged_crc_is_checked_over_whole_frame():
    body = pack_raw("w-1", "ecg", 1, 0.0, 500.0, 1, 1, 1, np.float32(1).tobytes())
    assert struct.unpack("<I", body[-4:])[0] == zlib.crc32(body[:-4])
    expect("bad_checksum", ECG, pack_raw("w-1", "ecg", 1, 0.0, 500.0, 1, 1, 1, np.float32(1).tobytes(), crc=1))


# -- imaging ------------------------------------------------------------------------------

def test_study_round_trip_is_real_dicom():
    import pydicom
    import io
    pixels = (np.random.default_rng(1).random((48, 40)) * 4095).astype(np.uint16)
    study = ImagingStudy(device_id="cr-1", patient_id="p-1", study_uid="1.2.826.0.1.3680043.8.498.1",
                         modality="CR", pixels=pixels, pixel_spacing=(0.15, 0.2), acquired_ts=1.7e9)
    wire = to_wire(study)
    ds = pydicom.dcmread(io.BytesIO(wire))
    assert ds.Modality == "CR" and ds.PatientID == "p-1" and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    back = from_wire(STUDY, wire)
    np.testing.assert_array_equal(back.pixels, pixels)
    assert (back.patient_id, back.study_uid, back.modality, back.pixel_spacing, back.acquired_ts) == (
        "p-1", study.study_uid, "CR", (0.15, 0.2), 1.7e9)
    assert back.device_id == "cr-1"


def test_float_pixels_survive_through_rescale():
    pixels = np.linspace(-1.5, 2.5, 64 * 64).reshape(64, 64)
    back = from_wire(STUDY, to_wire(ImagingStudy(device_id="cr-1", patient_id="p", study_uid="1.2.3", pixels=pixels)))
    np.testing.assert_allclose(back.pixels, pixels, atol=4.0 / 65535)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_study_accepts_a_dicom_file_produced_elsewhere(name):
    from pydicom.data import get_testdata_file
    path = get_testdata_file(name)
    with open(path, "rb") as fh:
        study = from_wire(STUDY, fh.read())
    assert study.pixels.ndim == 2 and study.pixels.size > 100
    assert study.patient_id and study.study_uid and study.modality in ("CT", "MR")


def test_study_bad_inputs():
    expect("bad_dicom", STUDY, b"not a dicom file at all")
    good = to_wire(ImagingStudy(device_id="cr-1", patient_id="p", study_uid="1.2.3", pixels=np.ones((8, 8), np.uint16)))
    expect("bad_dicom", STUDY, good[: len(good) - 40])          # pixel data cut short
    expect("oversized", STUDY, good + bytes(MAX_PAYLOAD))
    with pytest.raises(ProtocolError, match="wrong_shape"):
        ImagingStudy(device_id="cr-1", patient_id="p", study_uid="1", pixels=np.ones(8))
    with pytest.raises(ProtocolError, match="non_finite"):
        ImagingStudy(device_id="cr-1", patient_id="p", study_uid="1", pixels=np.full((2, 2), np.nan))


# -- EHR ----------------------------------------------------------------------------------

def test_ehr_round_trip_features_and_condition():
    feats = {"age": 71, "sex": 0, "heart_rate": 104.5, "spo2": 91.0, "troponin": 0.4}
    rec = EhrRecord.from_bundle(build_bundle("p-9", feats, "cardiac", ts=1.7e9))
    back = from_wire(RECORD, to_wire(rec))
    assert back.patient_id == "p-9"
    assert back.features() == {k: float(v) for k, v in feats.items()}
    assert back.condition() == "cardiac"
    assert EhrRecord.from_bundle(build_bundle("p-9", {"age": 40})).condition() is None


def test_ehr_age_from_birth_date():
    bundle = build_bundle("p-2", {"heart_rate": 70}, ts=1.7e9)  # 2023-11-14
    bundle["entry"][0]["resource"]["birthDate"] = "1950-12-01"
    assert EhrRecord.from_bundle(bundle).features()["age"] == 72.0


def test_ehr_bad_inputs():
    expect("bad_json", RECORD, b"{not json")
    expect("bad_fhir", RECORD, json.dumps({"resourceType": "Patient"}).encode())
    expect("bad_fhir", RECORD, json.dumps({"resourceType": "Bundle", "entry": []}).encode())
    expect("bad_fhir", RECORD, json.dumps([1, 2]).encode())
    good = build_bundle("p-1", {"age": 50, "heart_rate": 80}, "normal")
    for mutate in (
        lambda b: b["entry"][1]["resource"]["valueQuantity"].update(value="high"),
        lambda b: b["entry"][1]["resource"].pop("code"),
        lambda b: b["entry"].append({"resource": {"resourceType": "Patient", "id": "p-2"}}),
        lambda b: b["entry"][-1]["resource"]["code"]["coding"][0].update(code="flu"),
        lambda b: b["entry"][0]["resource"].update(birthDate="yesterday"),
        lambda b: b["entry"].append({"nothing": 1}),
    ):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        expect("bad_fhir", RECORD, json.dumps(bad).encode())
    nan_payload = json.dumps(good).replace('"value": 80.0', '"value": NaN')
    assert "NaN" in nan_payload
    expect("bad_json", RECORD, nan_payload.encode())          # NaN is not JSON (RFC 8259)
    assert set(CONDITIONS) >= {EhrRecord.from_bundle(good).condition()}


# -- notes, presence, registration --------------------------------------------------------

def test_json_messages_round_trip():
    note = ClinicalNote(patient_id="p-1", note_id="n-1", text="Chest pain, troponin up.", ts=5.0)
    assert from_wire(NOTE, to_wire(note)) == note
    pres = Presence(device_id="w-1", online=False, ts=3.0)
    assert from_wire(ECG.with_stream("presence"), to_wire(pres)) == pres
    reg = DeviceRegistration(hospital="h1", device_id="w-1", device_class="wearable", patient_id="p-1",
                             streams={"ecg": 512.0, "acc": 32.0}, model="W1", ts=1.0)
    assert from_wire(ECG.with_stream("registration"), to_wire(reg)) == reg


def test_json_messages_bad_inputs():
    note = json.loads(to_wire(ClinicalNote(patient_id="p-1", note_id="n-1", text="x", ts=1.0)))
    expect("bad_json", NOTE, b"\xff\xfe")
    expect("bad_version", NOTE, json.dumps({**note, "v": 2}).encode())
    expect("invalid", NOTE, json.dumps({**note, "text": ""}).encode())
    expect("invalid", NOTE, json.dumps({**note, "colour": "red"}).encode())   # extra field
    expect("invalid", NOTE, json.dumps({k: v for k, v in note.items() if k != "patient_id"}).encode())
    expect("topic_mismatch", ECG.with_stream("presence"),
           to_wire(Presence(device_id="w-2", online=True)))
    reg = DeviceRegistration(hospital="h1", device_id="w-1", device_class="wearable", patient_id="p",
                             streams={"ecg": 250.0})
    expect("topic_mismatch", Topic("h2", "wearable", "w-1", "registration"), to_wire(reg))
    expect("topic_mismatch", Topic("h1", "wearable", "w-2", "registration"), to_wire(reg))  # w-1 posing as w-2
    bad = json.loads(to_wire(reg))
    bad["streams"] = {"study": 1.0}
    expect("invalid", Topic("h1", "wearable", "w-1", "registration"), json.dumps(bad).encode())


def test_decoded_frame_is_the_same_model_as_a_validated_one():
    # decode_frame builds frames without a second pydantic pass; they must behave like validated ones.
    f = frame("acc", n=5, channels=3)
    g = from_wire(ACC, to_wire(f))
    assert type(g) is SignalFrame and g.model_fields_set == f.model_fields_set
    assert g.model_dump().keys() == f.model_dump().keys()
    assert SignalFrame(**{k: getattr(g, k) for k in SignalFrame.model_fields}).seq == g.seq
    with pytest.raises(ValidationError, match="frozen"):
        g.seq = 8                                       # frozen like every message
    assert not g.samples.flags.writeable                # a read-only view of the payload
    assert g.model_copy(update={"seq": 9}).seq == 9 and g.seq == 7


def test_non_finite_check_catches_every_position_and_mixed_infinities():
    # NaN/inf anywhere, +inf and -inf together (which cancel in a sum),
    # and float32 extremes (finite, must pass) are all decided correctly.
    for values in ([1.0, np.nan, 2.0, 3.0], [np.inf, 0, 0, -np.inf], [0, 0, 0, -np.inf]):
        expect("non_finite", ECG, pack_raw("w-1", "ecg", 1, 0.0, 500.0, 1, 1, 4,
                                           np.array(values, dtype="<f4").tobytes()))
    big = np.full(4, np.finfo(np.float32).max, dtype="<f4")
    g = from_wire(ECG, pack_raw("w-1", "ecg", 1, 0.0, 500.0, 1, 1, 4, big.tobytes()))
    np.testing.assert_array_equal(g.samples[:, 0], big)
    expect("wrong_sample_count", ECG, pack_raw("w-1", "ecg", 1, 0.0, 500.0, 1, 1, 0, b""))
    expect("bad_field", ECG, pack_raw("w/1", "ecg", 1, 0.0, 500.0, 1, 1, 1, bytes(4)))
    expect("unknown_stream", ECG, pack_raw("w-1", "xray", 1, 0.0, 500.0, 1, 1, 1, bytes(4)))
    expect("bad_field", ECG, pack_raw("w-1", "ecg", 1, 0.0, 0.0, 1, 1, 1, bytes(4)))
