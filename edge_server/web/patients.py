"""What the clinician's page shows of a patient, read from the edge's store as received."""
from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_server.dataset.records import refresh_records
from edge_server.dataset.preprocess import stream_from_frames
from edge_server.ingest.sqlite_store import DB_NAME, SqliteStore
from protocols.frames import decode_frame
from protocols.imaging import decode_study
from protocols.schema import EHR_FEATURES, LOINC_TO_FEATURE, MODALITIES, SIGNAL_STREAMS

#: Points per plotted signal: enough for a 1280-px-wide plot, small enough for the page.
PLOT_POINTS = 600
#: Seconds of each stream plotted (the newest ones).
PLOT_SECONDS = 20.0
#: Stream -> unit of the simulated wearables' samples (None: arbitrary units).
STREAM_UNITS = {"ecg": "mV", "ppg": "a.u.", "eda": "µS", "acc": "g", "temp": "°C", "resp": "a.u."}
#: Display names of the FHIR UCUM units.
UNIT_NAMES = {"a": "years", "Cel": "°C", "mm[Hg]": "mmHg", "10*3/uL": "10³/µL", "/min": "/min"}
EHR_LABELS = {"age": "Age", "sex": "Sex", "heart_rate": "Heart rate", "resp_rate": "Respiratory rate",
              "body_temp": "Body temperature", "spo2": "SpO₂", "systolic_bp": "Systolic BP",
              "diastolic_bp": "Diastolic BP", "wbc": "White cells", "lactate": "Lactate", "crp": "CRP",
              "troponin": "Troponin"}


class NoStore(LookupError):
    """The data dir has no edge store."""


@dataclass
class EhrRow:
    name: str
    label: str
    value: str
    unit: str
    low: float | None
    high: float | None
    flag: str  # "", "low", "high"


@dataclass
class Plot:
    stream: str
    unit: str
    seconds: float
    points: str  # SVG polyline points in a 0..1000 x 0..100 box
    lo: float
    hi: float


@dataclass
class PatientView:
    patient_id: str
    modalities: dict[str, bool]
    plots: list[Plot] = field(default_factory=list)
    has_image: bool = False
    ehr: list[EhrRow] = field(default_factory=list)
    note: str | None = None
    recorded_condition: str | None = None


def open_store(data_dir: Path) -> SqliteStore:
    if not (Path(data_dir) / DB_NAME).exists():
        raise NoStore(f"no edge store in {data_dir}")
    return SqliteStore(data_dir, readonly=True)


def search(data_dir: Path, query: str, page: int, size: int) -> tuple[list[dict], int]:
    """One page of patient ids containing ``query`` (case-insensitive), with their modalities; and the total."""
    with open_store(data_dir) as store:
        ids = [p for p in store.patients() if query.lower() in p.lower()]
    rows = []
    chunk = ids[page * size:(page + 1) * size]
    with SqliteStore(data_dir) as store:  # records are cached in the store as they are built
        hospital = store.get_meta("hospital") or ""
        present = {r.patient_id: set(r.modalities()) for r in refresh_records(store, hospital, patients=chunk)}
    for pid in chunk:
        rows.append({"id": pid, "modalities": [m for m in MODALITIES if m in present.get(pid, ())]})
    return rows, len(ids)


def _reference(name: str) -> tuple[float | None, float | None]:
    _, mean, std = EHR_FEATURES[name]
    if name == "sex":
        return None, None
    return max(0.0, mean - 2 * std), mean + 2 * std


def _ehr_rows(bundles: list[dict]) -> tuple[list[EhrRow], str | None]:
    values: dict[str, tuple[float | str, str]] = {}
    condition = None
    for bundle in bundles:  # oldest first: later values win, as in the model's input
        for entry in bundle.get("entry", []):
            res = entry.get("resource", {})
            kind = res.get("resourceType")
            if kind == "Patient" and res.get("gender"):
                values["sex"] = (res["gender"], "")
            elif kind == "Observation":
                codes = [c.get("code") for c in res.get("code", {}).get("coding", [])]
                name = next((LOINC_TO_FEATURE[c] for c in codes if c in LOINC_TO_FEATURE), None)
                q = res.get("valueQuantity") or {}
                if name and isinstance(q.get("value"), (int, float)):
                    values[name] = (float(q["value"]), str(q.get("unit", "")))
            elif kind == "Condition":
                coding = res.get("code", {}).get("coding", [{}])
                condition = coding[0].get("code") or coding[0].get("display") or condition
    rows = []
    for name in EHR_FEATURES:
        if name not in values:
            continue
        value, unit = values[name]
        low, high = _reference(name)
        flag = ""
        if isinstance(value, float) and low is not None:
            flag = "low" if value < low else "high" if value > high else ""
        shown = f"{value:.4g}" if isinstance(value, float) else value
        rows.append(EhrRow(name, EHR_LABELS.get(name, name), shown, UNIT_NAMES.get(unit, unit), low, high, flag))
    return rows, condition


def _plot(stream: str, rate: float, samples: np.ndarray) -> Plot | None:
    x = np.asarray(samples, dtype=np.float64)
    x = x[:, 0] if x.ndim == 2 else x  # first channel (acc: x axis)
    x = x[-int(PLOT_SECONDS * rate):]
    if x.size < 2 or not np.isfinite(x).all():
        return None
    step = max(1, math.ceil(x.size / PLOT_POINTS))
    y = x[::step]
    lo, hi = float(y.min()), float(y.max())
    span = hi - lo or 1.0
    pts = " ".join(f"{1000 * i / (len(y) - 1):.1f},{100 - 100 * (v - lo) / span:.1f}" for i, v in enumerate(y))
    return Plot(stream, STREAM_UNITS.get(stream, "a.u."), x.size / rate, pts, lo, hi)


def patient_view(data_dir: Path, patient_id: str) -> PatientView:
    """Everything the patient's page shows; :class:`LookupError` if the patient is not stored."""
    with open_store(data_dir) as store:
        if patient_id not in store.patients():
            raise LookupError(f"no patient {patient_id!r} at this hospital")
        per_stream: dict[str, list] = defaultdict(list)
        for row in store.frames(patient_id):
            frame = decode_frame(row.payload)
            per_stream[row.stream].append((frame.start_ts, frame.sample_rate, frame.samples))
        images = store.documents(patient_id, "image")
        bundles = [json.loads(d.payload) for d in store.documents(patient_id, "ehr")]
        notes = [json.loads(d.payload) for d in store.documents(patient_id, "note")]
    plots = []
    for stream in SIGNAL_STREAMS:
        if per_stream.get(stream):
            rate, _, samples = stream_from_frames(per_stream[stream])
            plot = _plot(stream, rate, samples)
            if plot is not None:
                plots.append(plot)
    ehr, condition = _ehr_rows(bundles)
    note = "\n\n".join(n.get("text", "") for n in sorted(notes, key=lambda n: n.get("ts", 0))) or None
    modalities = {"image": bool(images), "ehr": bool(ehr), "signals": bool(plots), "text": bool(note)}
    return PatientView(patient_id, modalities, plots, bool(images), ehr, note, condition)


def image_png(data_dir: Path, patient_id: str) -> bytes:
    """The patient's newest imaging study as an 8-bit PNG (window: 1st to 99th percentile)."""
    from PIL import Image

    with open_store(data_dir) as store:
        images = store.documents(patient_id, "image")
    if not images:
        raise LookupError(f"no image of patient {patient_id!r}")
    pixels = decode_study(images[-1].device_id, images[-1].payload).pixels.astype(np.float64)
    lo, hi = np.percentile(pixels, [1, 99])
    grey = np.clip((pixels - lo) / ((hi - lo) or 1.0) * 255, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    return buf.getvalue()
