"""Patient records for training and inference, built from what the store holds as received.

Records are rebuilt from the raw rows whenever a patient has new data and cached in the
store keyed by the patient's version, so :func:`load_records` is cheap when nothing changed
and the preprocessing can be changed and re-run over the same raw data at any time.
"""
from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from protocols.errors import ProtocolError
from protocols.frames import decode_frame
from protocols.imaging import decode_study
from protocols.messages import ClinicalNote
from protocols.schema import PatientRecord

from edge_server.dataset.preprocess import TextEmbedder, patient_record_from_raw, stream_from_frames
from edge_server.ingest.sqlite_store import DB_NAME, SqliteStore
from edge_server.ingest.store import Store

log = logging.getLogger(__name__)

_ARRAYS = ("image", "ehr", "signal_windows")


def record_to_bytes(record: PatientRecord) -> bytes:
    """A self-contained ``.npz`` of ``record`` (arrays plus JSON metadata; no pickle)."""
    arrays = {k: getattr(record, k) for k in _ARRAYS if getattr(record, k) is not None}
    arrays.update({f"extra.{k}": np.asarray(v) for k, v in record.extra.items() if isinstance(v, np.ndarray)})
    meta = {"patient_id": record.patient_id, "hospital": record.hospital, "label": record.label,
            "note": record.note, "extra": {k: v for k, v in record.extra.items() if not isinstance(v, np.ndarray)}}
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return buf.getvalue()


def record_from_bytes(blob: bytes) -> PatientRecord:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        meta = json.loads(npz["__meta__"].tobytes())
        extra = dict(meta["extra"])
        extra.update({k[len("extra."):]: npz[k] for k in npz.files if k.startswith("extra.")})
        return PatientRecord(patient_id=meta["patient_id"], hospital=meta["hospital"], label=meta["label"],
                             note=meta["note"], extra=extra,
                             **{k: npz[k] for k in _ARRAYS if k in npz.files})


def build_record(store: Store, patient_id: str, hospital: str,
                 text_embedder: TextEmbedder | None = None) -> PatientRecord:
    """Preprocess everything ``store`` holds for ``patient_id`` into one record."""
    per_device: dict[tuple[str, str], list] = defaultdict(list)
    for row in store.frames(patient_id):
        frame = decode_frame(row.payload)
        per_device[(row.device_id, row.stream)].append((frame.start_ts, frame.sample_rate, frame.samples))
    # One device per stream: where several recorded the same stream, keep the longest.
    best: dict[str, tuple[float, float, np.ndarray]] = {}
    for (_, stream), frames in sorted(per_device.items()):
        rate, t0, samples = stream_from_frames(frames)
        if stream not in best or len(samples) / rate > len(best[stream][2]) / best[stream][0]:
            best[stream] = (rate, t0, samples)
    start = min((t0 for _, t0, _ in best.values()), default=0.0)
    streams = {s: (rate, x) for s, (rate, _, x) in best.items()}
    offsets = {s: t0 - start for s, (_, t0, _) in best.items()}

    image = None
    images = store.documents(patient_id, "image")
    if images:
        image = decode_study(images[-1].device_id, images[-1].payload).pixels
    bundles = [json.loads(d.payload) for d in store.documents(patient_id, "ehr")]
    notes = [ClinicalNote.model_validate_json(d.payload) for d in store.documents(patient_id, "note")]
    note = "\n\n".join(n.text for n in sorted(notes, key=lambda n: n.ts)) or None
    record = patient_record_from_raw(patient_id, hospital, streams, image, bundles or None, note,
                                     offsets=offsets, text_embedder=text_embedder)
    record.extra["sources"] = {"frames": sum(len(v) for v in per_device.values()), "images": len(images),
                               "ehr": len(bundles), "notes": len(notes)}
    return record


def refresh_records(store: Store, hospital: str, text_embedder: TextEmbedder | None = None,
                    patients: list[str] | None = None) -> list[PatientRecord]:
    """Every patient's record, rebuilding (and re-caching) only those with new rows."""
    out = []
    for pid in patients if patients is not None else store.patients():
        version = store.patient_version(pid)
        cached = store.cached_record(pid)
        if cached is not None and cached[0] == version:
            out.append(record_from_bytes(cached[1]))
            continue
        try:
            record = build_record(store, pid, hospital, text_embedder)
        except (ProtocolError, ValueError) as err:
            log.warning("cannot build record of patient %s: %s", pid, err)
            continue
        store.cache_record(pid, version, record_to_bytes(record))
        out.append(record)
    return out


def load_records(data_dir: Path | str, text_embedder: TextEmbedder | None = None) -> list[PatientRecord]:
    """Preprocessed records of every patient in the edge store at ``data_dir`` (sorted by id).

    The label is the index of the patient's FHIR Condition in ``schema.CONDITIONS`` (None when
    no EHR record carried one). Safe to call while ``iomt edge run`` writes the same store.
    A directory without a store has no records (and is left untouched), unless it is a
    bring-your-own-data hospital folder (``labels.csv``, see docs/byod.md), which is loaded
    and validated with :func:`edge_server.dataset.byod.load_hospital_folder`.
    """
    if not (Path(data_dir) / DB_NAME).exists():
        from edge_server.dataset.byod import is_hospital_folder, load_hospital_folder
        if is_hospital_folder(data_dir):  # bring-your-own-data folder (docs/byod.md)
            return sorted(load_hospital_folder(data_dir), key=lambda r: r.patient_id)
        log.warning("no edge store in %s (has `iomt edge run --data-dir %s` run?): no records", data_dir, data_dir)
        return []
    with SqliteStore(data_dir) as store:
        hospital = store.get_meta("hospital") or ""
        return refresh_records(store, hospital, text_embedder)
