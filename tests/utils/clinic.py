"""A real edge store whose patients have every modality (signals, image, EHR, note), for the pages."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edge_server.ingest.sqlite_store import SqliteStore
from edge_server.ingest.store import Batch, DocumentRow, FrameRow
from protocols.fhir import build_bundle
from protocols.messages import ClinicalNote, ImagingStudy, SignalFrame, to_wire
from protocols.schema import CONDITIONS, SIGNAL_STREAMS

NOTES = ("routine review, no complaints", "chest pain on exertion, palpitations", "shortness of breath, cough")


def write_full_store(data_dir: Path, n: int, seed: int = 0, hospital: str = "h0", seconds: float = 16.0,
                     frame_s: float = 4.0) -> list[str]:
    """``n`` patients (ids ``{hospital}-p0000``...) with all four modalities, as the edge stores them."""
    rng = np.random.default_rng(seed)
    t0 = time.time() - seconds
    frames, docs, ids = [], [], []
    for i in range(n):
        label = i % len(CONDITIONS)
        pid = f"{hospital}-p{i:04d}"
        ids.append(pid)
        hr = (72, 105, 88)[label] / 60.0
        for stream, (channels, rate) in SIGNAL_STREAMS.items():
            dev = f"wear-{pid}"
            for seq in range(int(seconds / frame_s)):
                t = seq * frame_s + np.arange(int(frame_s * rate))[:, None] / rate
                x = np.sin(2 * np.pi * hr * t + np.arange(channels)) + 0.1 * rng.normal(size=(len(t), channels))
                if stream == "temp":
                    x = 36.8 + 0.2 * label + 0.05 * x
                msg = SignalFrame.build(dev, stream, seq, t0 + seq * frame_s, rate, x)
                frames.append(FrameRow(dev, stream, seq, pid, t0 + seq * frame_s, rate, len(t), channels,
                                       time.time(), to_wire(msg)))
        yy, xx = np.mgrid[0:96, 0:96]
        pixels = (1000 + 300 * np.exp(-((xx - 30 - 15 * label) ** 2 + (yy - 48) ** 2) / 200.0)
                  + rng.normal(0, 20, (96, 96))).astype(np.uint16)
        study = ImagingStudy(device_id="xray-1", patient_id=pid, study_uid=f"1.2.3.{i}", pixels=pixels)
        docs.append(DocumentRow("image", f"1.2.3.{i}", "xray-1", "study", pid, time.time(), to_wire(study)))
        features = {"age": float(rng.normal(60, 10)), "sex": float(i % 2),
                    "heart_rate": float(rng.normal((75, 112, 90)[label], 5)),
                    "resp_rate": float(rng.normal((15, 17, 26)[label], 2)),
                    "spo2": float(rng.normal((97, 96, 90)[label], 1.0)),
                    "body_temp": float(rng.normal(37.0 + 0.4 * label, 0.2)),
                    "troponin": float(abs(rng.normal((0.01, 0.3, 0.02)[label], 0.01)))}
        bundle = build_bundle(pid, features, CONDITIONS[label], ts=t0)
        docs.append(DocumentRow("ehr", f"ehr-{pid}", "ehr-feed", "record", pid, time.time(), json.dumps(bundle).encode()))
        note = ClinicalNote(patient_id=pid, note_id=f"n{i}", text=NOTES[label], ts=t0)
        docs.append(DocumentRow("note", f"n{i}", "notes", "note", pid, time.time(), note.model_dump_json().encode()))
    with SqliteStore(data_dir) as store:
        store.set_meta("hospital", hospital)
        store.commit(Batch(frames=frames, documents=docs, received=len(frames) + len(docs)))
    return ids
