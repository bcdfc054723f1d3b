"""Wire messages for the edge's tests and fuzzers: valid ones for every stream and forged bad ones."""
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


def deflated_study(device_id: str, patient_id: str, uid: str, rows: int, cols: int) -> tuple[str, bytes]:
    """A DICOM file in the deflated transfer syntax whose pixel data is ``rows x cols`` 16-bit zeros.

    The zeros are streamed through zlib 64 MiB at a time (one block, repeated: each ends on a
    full flush, so copies of it continue the stream), so a gigabyte of pixels costs a second
    and a few megabytes here, and about 1/1000 of its size on the wire: a deflate bomb.
    """
    import io
    import struct
    import zlib

    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(study(device_id, patient_id, uid, size=2)[1]))
    del ds.PixelData
    ds.Rows, ds.Columns = rows, cols
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    fp = io.BytesIO(buf.getvalue())
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    meta, body = buf.getvalue()[:fp.tell()], zlib.decompress(buf.getvalue()[fp.tell():], -zlib.MAX_WBITS)
    size, block = rows * cols * 2, 64 * 1024 * 1024
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = body + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", size)
    out = [deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)]
    out.append((deflate.compress(bytes(block)) + deflate.flush(zlib.Z_FULL_FLUSH)) * (size // block))
    out.append(deflate.compress(bytes(size % block)) + deflate.flush())
    return topic(device_id, "study", "imaging"), meta + b"".join(out)
