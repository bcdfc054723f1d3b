"""Wire messages for edge tests: valid ones for every stream and forged bad ones."""
from __future__ import annotations

import numpy as np

from protocols.fhir import build_bundle
from protocols.messages import ClinicalNote, DeviceRegistration, EhrRecord, ImagingStudy, SignalFrame, to_wire
from protocols.schema import SIGNAL_STREAMS
from protocols.topics import Topic

HOSPITAL = "h1"
T0 = 1.7e9


def topic(device_id: str, stream: str, device_class: str = "wearable", hospital: str = HOSPITAL) -> str:
    return str(Topic(hospital, device_class, device_id, stream))


def registration(device_id: str, patient_id: str, device_class: str = "wearable",
                 streams: dict[str, float] | None = None, hospital: str = HOSPITAL) -> tuple[str, bytes]:
    if streams is None:
        streams = {s: rate for s, (_, rate) in SIGNAL_STREAMS.items()} if device_class == "wearable" else {
            {"imaging": "study", "ehr": "record", "notes": "note"}[device_class]: 0.0}
    reg = DeviceRegistration(hospital=hospital, device_id=device_id, device_class=device_class,
                             patient_id=patient_id, streams=streams)
    return topic(device_id, "registration", device_class, hospital), to_wire(reg)


def frame(device_id: str, stream: str, seq: int, seconds: float = 1.0, rate: float | None = None,
          seed: int = 0) -> tuple[str, bytes]:
    channels, nominal = SIGNAL_STREAMS[stream]
    rate = rate or nominal
    n = max(1, int(round(seconds * rate)))
    t = T0 + seq * seconds + np.arange(n)[:, None] / rate
    samples = np.sin(2 * np.pi * 1.1 * t + np.arange(channels)) + 0.01 * np.random.default_rng(seed + seq).normal(
        size=(n, channels))
    msg = SignalFrame.build(device_id, stream, seq, T0 + seq * seconds, rate, samples)
    return topic(device_id, stream), to_wire(msg)


def study(device_id: str, patient_id: str, uid: str, size: int = 96) -> tuple[str, bytes]:
    pixels = (np.add.outer(np.arange(size), np.arange(size)) % 256).astype(np.uint16)
    msg = ImagingStudy(device_id=device_id, patient_id=patient_id, study_uid=uid, pixels=pixels)
    return topic(device_id, "study", "imaging"), to_wire(msg)


def ehr(device_id: str, patient_id: str, condition: str | None = "cardiac",
        features: dict[str, float] | None = None) -> tuple[str, bytes]:
    feats = features or {"age": 61.0, "sex": 1.0, "heart_rate": 95.0, "troponin": 0.2}
    msg = EhrRecord(patient_id=patient_id, bundle=build_bundle(patient_id, feats, condition, ts=T0))
    return topic(device_id, "record", "ehr"), to_wire(msg)


def note(device_id: str, patient_id: str, note_id: str, text: str = "chest pain on exertion") -> tuple[str, bytes]:
    msg = ClinicalNote(patient_id=patient_id, note_id=note_id, text=text, ts=T0)
    return topic(device_id, "note", "notes"), to_wire(msg)
