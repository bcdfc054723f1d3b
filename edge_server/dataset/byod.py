"""Bring your own data: load a hospital's records from a documented on-disk folder.

The format (see ``docs/byod.md``) is a folder per hospital::

    labels.csv               patient_id,label            (required)
    ehr.csv | ehr.parquet    patient_id,<EHR feature>... (optional, raw units)
    images/<patient_id>.png | .dcm                       (optional)
    signals/<patient_id>.npz one array per stream, plus <stream>_rate (optional)
    notes/<patient_id>.txt                               (optional, UTF-8)

and, for a whole federation, a folder of such hospital folders with an optional
``dataset.json`` that names the classes and declares extra EHR columns. Every problem is
reported as :class:`ByodError` naming the offending file (and row, for tables); images and
signals go through the edge's own preprocessing, so BYOD records match ingested ones.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocols.errors import IomtError
from protocols.schema import CONDITIONS, EHR_DIM, EHR_FEATURES, SIGNAL_STREAMS, PatientRecord, standardise_ehr

log = logging.getLogger(__name__)

DATASET_META = "dataset.json"
LABELS_FILE = "labels.csv"
IMAGE_SUFFIXES = (".png", ".dcm")
#: Most rows a labels/EHR table may hold; a guard against pointing the loader at the wrong file.
MAX_ROWS = 1_000_000


class ByodError(IomtError):
    """A BYOD folder that does not follow the format; names the file and, for tables, the row.

    ``row`` counts data rows from 1 (the header is not a row), so row ``n`` of a CSV is on
    line ``n + 1``.
    """

    def __init__(self, file: Path | str, detail: str, row: int | None = None) -> None:
        where = f"{file}" if row is None else f"{file}, row {row}"
        super().__init__(f"{where}: {detail}")
        self.file = str(file)
        self.row = row
        self.detail = detail


@dataclass(frozen=True)
class ByodSchema:
    """What a BYOD dataset declares in its ``dataset.json`` (all optional).

    ``classes`` names the label indices (default: :data:`protocols.schema.CONDITIONS`);
    ``ehr_extra`` maps each extra EHR column to the ``(mean, std)`` used to standardise it,
    identically in every hospital. Records then carry ``EHR_DIM + len(ehr_extra)`` EHR
    features: the schema's features first, then the extra ones in declared order.
    """

    classes: tuple[str, ...] = CONDITIONS
    ehr_extra: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def ehr_dim(self) -> int:
        return EHR_DIM + len(self.ehr_extra)

    def to_json(self) -> dict:
        return {"classes": list(self.classes),
                "ehr_extra": {k: [m, s] for k, (m, s) in self.ehr_extra.items()}}


def read_schema(root: Path | str) -> ByodSchema:
    """The schema declared in ``root/dataset.json``, or the default one when there is none."""
    path = Path(root) / DATASET_META
    if not path.exists():
        return ByodSchema()
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ByodError(path, f"not valid JSON ({err})") from err
    if not isinstance(meta, dict) or set(meta) - {"classes", "ehr_extra", "description"}:
        raise ByodError(path, "expected an object with keys 'classes', 'ehr_extra', 'description'")
    classes = meta.get("classes", list(CONDITIONS))
    if (not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes)
            or not all(isinstance(c, str) and c for c in classes)):
        raise ByodError(path, "'classes' must be a list of at least two distinct names")
    extra: dict[str, tuple[float, float]] = {}
    for name, spec in (meta.get("ehr_extra") or {}).items():
        if name in EHR_FEATURES or name == "patient_id":
            raise ByodError(path, f"extra EHR column {name!r} clashes with a schema feature")
        if (not isinstance(spec, list) or len(spec) != 2
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in spec) or spec[1] <= 0):
            raise ByodError(path, f"extra EHR column {name!r} needs [mean, std] with std > 0")
        extra[name] = (float(spec[0]), float(spec[1]))
    return ByodSchema(tuple(classes), extra)


def write_schema(root: Path | str, schema: ByodSchema, description: str = "") -> None:
    meta = schema.to_json()
    if description:
        meta["description"] = description
    (Path(root) / DATASET_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def write_labels(folder: Path | str, labels: Iterable[tuple[str, str]]) -> None:
    """Write a hospital folder's ``labels.csv`` from ``(patient_id, class name)`` pairs."""
    with (Path(folder) / LABELS_FILE).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "label"])
        w.writerows(labels)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as err:
        raise ByodError(path, f"not UTF-8 text ({err})") from err
    except csv.Error as err:
        raise ByodError(path, f"not a readable CSV ({err})") from err
    if not rows:
        raise ByodError(path, "empty file: expected a header line")
    if len(rows) - 1 > MAX_ROWS:
        raise ByodError(path, f"more than {MAX_ROWS} rows")
    header = [h.strip() for h in rows[0]]
    body = []
    for i, row in enumerate(rows[1:], start=1):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            raise ByodError(path, f"{len(row)} fields, header has {len(header)}", row=i)
        body.append((i, [cell.strip() for cell in row]))
    return header, body


def read_labels(path: Path, schema: ByodSchema) -> dict[str, int]:
    """``patient_id -> label index`` from a labels file; labels are indices or class names."""
    if not path.exists():
        raise ByodError(path, "missing: every hospital folder needs labels.csv (patient_id,label)")
    header, body = _read_csv(path)
    if header[:2] != ["patient_id", "label"] or len(header) != 2:
        raise ByodError(path, f"header must be 'patient_id,label', got {','.join(header)!r}", row=None)
    labels: dict[str, int] = {}
    for row, (pid, raw) in body:
        if not pid:
            raise ByodError(path, "empty patient_id", row=row)
        if not _safe_id(pid):
            raise ByodError(path, f"patient_id {pid!r} may only use letters, digits, '-', '_' and '.'", row=row)
        if pid in labels:
            raise ByodError(path, f"duplicate patient_id {pid!r}", row=row)
        if raw in schema.classes:
            labels[pid] = schema.classes.index(raw)
            continue
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if not 0 <= value < len(schema.classes):
            raise ByodError(path, f"label {raw!r} is neither a class name nor an index "
                                  f"0..{len(schema.classes) - 1} of {list(schema.classes)}", row=row)
        labels[pid] = value
    if not labels:
        raise ByodError(path, "no patients")
    return labels


def _safe_id(pid: str) -> bool:
    return all(c.isalnum() or c in "-_." for c in pid) and not pid.startswith(".")


def _ehr_table(folder: Path) -> tuple[Path, list[str], list[tuple[int, list[object]]]] | None:
    csv_path, pq_path = folder / "ehr.csv", folder / "ehr.parquet"
    if csv_path.exists() and pq_path.exists():
        raise ByodError(folder, "both ehr.csv and ehr.parquet: keep one")
    if csv_path.exists():
        header, body = _read_csv(csv_path)
        return csv_path, header, [(i, list(r)) for i, r in body]
    if pq_path.exists():
        import pyarrow.parquet as pq  # only when a hospital ships Parquet
        try:
            table = pq.read_table(pq_path)
        except Exception as err:  # pyarrow raises several unrelated types for bad files
            raise ByodError(pq_path, f"not a readable Parquet file ({err})") from err
        header = list(table.column_names)
        columns = [table.column(c).to_pylist() for c in header]
        body = [(i + 1, [col[i] for col in columns]) for i in range(table.num_rows)]
        return pq_path, header, body
    return None


def read_ehr(folder: Path, schema: ByodSchema, labels: dict[str, int]) -> dict[str, np.ndarray]:
    """``patient_id -> standardised EHR vector`` (length ``schema.ehr_dim``; NaN = missing)."""
    found = _ehr_table(folder)
    if found is None:
        return {}
    path, header, body = found
    if not header or header[0] != "patient_id":
        raise ByodError(path, "the first column must be patient_id")
    known = set(EHR_FEATURES) | set(schema.ehr_extra)
    for name in header[1:]:
        if name not in known:
            raise ByodError(path, f"unknown column {name!r}: use the EHR feature names of "
                                  f"protocols.schema.EHR_FEATURES or declare it in {DATASET_META} 'ehr_extra'")
    if len(set(header)) != len(header):
        raise ByodError(path, "a column appears twice in the header")
    out: dict[str, np.ndarray] = {}
    for row, cells in body:
        pid = "" if cells[0] is None else str(cells[0]).strip()
        if pid not in labels:
            raise ByodError(path, f"patient_id {pid!r} is not in {LABELS_FILE}", row=row)
        if pid in out:
            raise ByodError(path, f"duplicate patient_id {pid!r}", row=row)
        values: dict[str, float] = {}
        for name, cell in zip(header[1:], cells[1:]):
            if cell is None or (isinstance(cell, str) and cell == ""):
                continue
            try:
                value = float(cell)
            except (TypeError, ValueError):
                raise ByodError(path, f"column {name!r}: {cell!r} is not a number", row=row) from None
            if not math.isfinite(value):
                raise ByodError(path, f"column {name!r}: {cell!r} is not finite (leave the cell empty "
                                      "for a missing value)", row=row)
            values[name] = value
        vec = standardise_ehr({k: v for k, v in values.items() if k in EHR_FEATURES})
        if schema.ehr_extra:
            extra = np.array([(values[k] - m) / s if k in values else np.nan
                              for k, (m, s) in schema.ehr_extra.items()], dtype=np.float32)
            vec = np.concatenate([vec, extra])
        out[pid] = vec.astype(np.float32)
    return out


def _per_patient_files(folder: Path, sub: str, suffixes: tuple[str, ...],
                       labels: dict[str, int]) -> dict[str, Path]:
    directory = folder / sub
    if not directory.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        if path.suffix.lower() not in suffixes:
            raise ByodError(path, f"unexpected file in {sub}/: expected <patient_id>{' or '.join(suffixes)}")
        pid = path.stem
        if pid not in labels:
            raise ByodError(path, f"patient_id {pid!r} is not in {LABELS_FILE}")
        if pid in found:
            raise ByodError(path, f"a second {sub} file for patient {pid!r} (also {found[pid].name})")
        found[pid] = path
    return found


def read_image(path: Path) -> np.ndarray:
    """A 2-D float32 array of the image's pixels (PNG through Pillow, DICOM through pydicom)."""
    try:
        if path.suffix.lower() == ".dcm":
            import pydicom
            pixels = np.asarray(pydicom.dcmread(path).pixel_array, dtype=np.float32)
        else:
            from PIL import Image
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("L"), dtype=np.float32)
    except Exception as err:  # both libraries raise many kinds of errors for corrupt files
        raise ByodError(path, f"not a readable {path.suffix.lstrip('.').upper()} image ({err})") from err
    if pixels.ndim == 3:  # multi-frame DICOM or colour: take the first frame / mean channel
        pixels = pixels[0] if path.suffix.lower() == ".dcm" else pixels.mean(axis=-1)
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise ByodError(path, f"expected a 2-D image, got shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise ByodError(path, "image has NaN or infinite pixels")
    return pixels


def read_signals(path: Path) -> dict[str, tuple[float, np.ndarray]]:
    """``stream -> (rate Hz, samples (n, channels))`` from a ``signals/<patient_id>.npz``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:  # zipfile / numpy raise several types for corrupt archives
        raise ByodError(path, f"not a readable .npz archive ({err})") from err
    streams: dict[str, tuple[float, np.ndarray]] = {}
    for key in arrays:
        if key.endswith("_rate"):
            if key[:-5] not in arrays:
                raise ByodError(path, f"{key!r} has no matching {key[:-5]!r} array")
            continue
        if key not in SIGNAL_STREAMS:
            raise ByodError(path, f"unknown stream {key!r}: expected one of {sorted(SIGNAL_STREAMS)}")
        channels = SIGNAL_STREAMS[key][0]
        rate_key = f"{key}_rate"
        if rate_key not in arrays:
            raise ByodError(path, f"stream {key!r} has no {rate_key!r} scalar (sample rate in Hz)")
        rate = np.asarray(arrays[rate_key])
        if rate.size != 1 or not np.issubdtype(rate.dtype, np.number) or not 0 < float(rate) <= 10_000:
            raise ByodError(path, f"{rate_key!r} must be one positive number of Hz (<= 10000)")
        samples = np.asarray(arrays[key])
        if not np.issubdtype(samples.dtype, np.number):
            raise ByodError(path, f"stream {key!r} is not numeric ({samples.dtype})")
        samples = samples.astype(np.float32)
        if samples.ndim == 1:
            samples = samples[:, None]
        if samples.ndim != 2 or samples.shape[1] != channels:
            raise ByodError(path, f"stream {key!r} must have shape (n,{channels}), got {arrays[key].shape}")
        if not np.isfinite(samples).all():
            raise ByodError(path, f"stream {key!r} has NaN or infinite samples")
        streams[key] = (float(rate), samples)
    return streams


def read_note(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise ByodError(path, f"not UTF-8 text ({err})") from err


def is_hospital_folder(path: Path | str) -> bool:
    """Whether ``path`` looks like a BYOD hospital folder (it has ``labels.csv``)."""
    return (Path(path) / "labels.csv").is_file()


def model_overrides(path: Path | str) -> dict:
    """ModelConfig fields a BYOD hospital folder's ``dataset.json`` fixes (EHR width, classes)."""
    schema = read_schema(Path(path).parent)
    return {"ehr_dim": schema.ehr_dim, "num_classes": len(schema.classes)}


def load_hospital_folder(path: Path | str, schema: ByodSchema | None = None,
                         hospital: str | None = None) -> list[PatientRecord]:
    """Validate and load one hospital folder into preprocessed :class:`PatientRecord` s.

    Images and signals go through :func:`edge_server.dataset.preprocess.patient_record_from_raw`
    (the same filtering, resampling, windowing and normalisation as ingested data); the EHR
    is standardised with the schema's reference ranges (and ``schema.ehr_extra``).

    Raises
    ------
    ByodError
        naming the offending file (and row) for any departure from the format.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ByodError(folder, "not a folder")
    schema = read_schema(folder.parent) if schema is None else schema
    hospital = hospital or folder.name
    labels = read_labels(folder / LABELS_FILE, schema)
    ehr = read_ehr(folder, schema, labels)
    images = _per_patient_files(folder, "images", IMAGE_SUFFIXES, labels)
    signals = _per_patient_files(folder, "signals", (".npz",), labels)
    notes = _per_patient_files(folder, "notes", (".txt",), labels)

    from edge_server.dataset.preprocess import patient_record_from_raw  # torch-free, but heavy-ish scipy

    records = []
    for pid, label in labels.items():
        streams = read_signals(signals[pid]) if pid in signals else {}
        image = read_image(images[pid]) if pid in images else None
        note = read_note(notes[pid]) if pid in notes else None
        try:
            record = patient_record_from_raw(pid, hospital, streams, image, None, note or None, label=label)
        except (IomtError, ValueError) as err:
            bad = signals.get(pid) or images.get(pid) or folder
            raise ByodError(bad, f"preprocessing patient {pid!r} failed: {err}") from err
        record.ehr = ehr.get(pid)
        records.append(record)
    log.info("loaded %d patients from %s (%d with EHR, %d images, %d signals, %d notes)",
             len(records), folder, len(ehr), len(images), len(signals), len(notes))
    return records


def load_federation_folder(root: Path | str) -> tuple[ByodSchema, dict[str, list[PatientRecord]]]:
    """Every hospital folder (a sub-folder with ``labels.csv``) under ``root``, by name."""
    root = Path(root)
    if not root.is_dir():
        raise ByodError(root, "not a folder")
    schema = read_schema(root)
    hospitals = {d.name: load_hospital_folder(d, schema)
                 for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not hospitals:
        raise ByodError(root, "no hospital folders (sub-folders with labels.csv)")
    return schema, hospitals
