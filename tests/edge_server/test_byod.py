"""Bring-your-own-data loader: a valid folder loads, and every kind of problem is reported
with the offending file (and row)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edge_server.dataset.byod import ByodError, load_federation_folder, load_hospital_folder, read_schema
from protocols.schema import CONDITIONS, EHR_DIM, EHR_FEATURES, IMAGE_SIZE, SIGNAL_CHANNELS, WINDOW_SAMPLES


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def hospital(tmp_path):
    """A hospital folder with every modality for p1, EHR only for p2, a note only for p3."""
    h = tmp_path / "hosp"
    _write(h / "labels.csv", "patient_id,label\np1,cardiac\np2,0\np3,respiratory\n")
    _write(h / "ehr.csv", "patient_id,age,heart_rate,spo2\np1,70,110,95\np2,40,,99\n")
    (h / "images").mkdir()
    Image.fromarray((np.arange(100 * 80) % 255).reshape(100, 80).astype(np.uint8)).save(h / "images" / "p1.png")
    (h / "signals").mkdir()
    t = np.arange(0, 20, 1 / 250)
    np.savez(h / "signals" / "p1.npz", ecg=np.sin(2 * np.pi * 1.2 * t), ecg_rate=250.0,
             acc=np.zeros((20 * 32, 3)), acc_rate=32.0)
    _write(h / "notes" / "p1.txt", "chest pain radiating to the left arm")
    _write(h / "notes" / "p3.txt", "productive cough and fever")
    return h


def test_valid_folder_loads_every_modality(hospital):
    records = {r.patient_id: r for r in load_hospital_folder(hospital)}

    assert set(records) == {"p1", "p2", "p3"}
    p1, p2, p3 = records["p1"], records["p2"], records["p3"]
    assert (p1.label, p2.label, p3.label) == (CONDITIONS.index("cardiac"), 0, CONDITIONS.index("respiratory"))
    assert p1.modalities() == ("image", "ehr", "signals", "text")
    assert p1.image.shape == (IMAGE_SIZE, IMAGE_SIZE) and abs(float(p1.image.mean())) < 1e-4
    assert p1.signal_windows.shape[1:] == (WINDOW_SAMPLES, len(SIGNAL_CHANNELS))
    _, mean, std = EHR_FEATURES["age"]
    assert p1.ehr.shape == (EHR_DIM,) and p1.ehr[0] == pytest.approx((70 - mean) / std)
    assert np.isnan(p2.ehr[list(EHR_FEATURES).index("heart_rate")])  # empty cell = missing
    assert p2.modalities() == ("ehr",) and p3.modalities() == ("text",)
    assert all(r.hospital == "hosp" for r in records.values())


def test_parquet_ehr_and_dicom_image(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    from pydicom import Dataset

    h = tmp_path / "h"
    _write(h / "labels.csv", "patient_id,label\nq1,1\n")
    pq.write_table(pa.table({"patient_id": ["q1"], "troponin": [0.5]}), h / "ehr.parquet")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 1, 16, 16, 15
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.PixelData = (np.arange(32 * 32, dtype=np.uint16)).tobytes()
    (h / "images").mkdir()
    ds.save_as(h / "images" / "q1.dcm", enforce_file_format=True)

    (rec,) = load_hospital_folder(h)

    _, mean, std = EHR_FEATURES["troponin"]
    assert rec.ehr[list(EHR_FEATURES).index("troponin")] == pytest.approx((0.5 - mean) / std)
    assert rec.image.shape == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("labels, row, fragment", [
    ("patient_id,label\np1,cardiac\np1,normal\n", 2, "duplicate patient_id"),
    ("patient_id,label\np1,sick\n", 1, "neither a class name nor an index"),
    ("patient_id,label\np1,7\n", 1, "neither a class name nor an index"),
    ("patient_id,label\n,normal\n", 1, "empty patient_id"),
    ("patient_id,label\np1,normal\np/2,normal\n", 2, "may only use letters"),
    ("patient_id,label\np1,normal,extra\n", 1, "3 fields"),
])
def test_bad_labels_name_file_and_row(tmp_path, labels, row, fragment):
    _write(tmp_path / "h" / "labels.csv", labels)

    with pytest.raises(ByodError) as err:
        load_hospital_folder(tmp_path / "h")

    assert err.value.file.endswith("labels.csv") and err.value.row == row
    assert fragment in str(err.value) and f"labels.csv, row {row}" in str(err.value)


def test_missing_labels_and_bad_header(tmp_path):
    (tmp_path / "h").mkdir()
    with pytest.raises(ByodError, match=r"labels\.csv: missing"):
        load_hospital_folder(tmp_path / "h")
    _write(tmp_path / "h" / "labels.csv", "id,diagnosis\np1,normal\n")
    with pytest.raises(ByodError, match=r"labels\.csv: header must be 'patient_id,label'"):
        load_hospital_folder(tmp_path / "h")


@pytest.mark.parametrize("ehr, row, fragment", [
    ("patient_id,age\np1,70\np2,old\n", 2, "column 'age': 'old' is not a number"),
    ("patient_id,age\np1,inf\n", 1, "not finite"),
    ("patient_id,age\np9,70\n", 1, "'p9' is not in labels.csv"),
    ("patient_id,age\np1,70\np1,71\n", 2, "duplicate patient_id"),
    ("patient_id,age,cholesterol\np1,70,5\n", None, "unknown column 'cholesterol'"),
])
def test_bad_ehr_names_file_and_row(tmp_path, ehr, row, fragment):
    _write(tmp_path / "h" / "labels.csv", "patient_id,label\np1,normal\np2,cardiac\n")
    _write(tmp_path / "h" / "ehr.csv", ehr)

    with pytest.raises(ByodError) as err:
        load_hospital_folder(tmp_path / "h")

    assert err.value.file.endswith("ehr.csv") and err.value.row == row and fragment in str(err.value)


def test_bad_per_patient_files_name_the_file(tmp_path):
    h = tmp_path / "h"
    _write(h / "labels.csv", "patient_id,label\np1,normal\n")
    cases = [
        ("images/p1.png", b"not a png", "not a readable PNG image"),
        ("images/p2.png", None, "'p2' is not in labels.csv"),
        ("images/p1.jpg", b"", "unexpected file in images/"),
        ("signals/p1.npz", {"ecg": np.zeros(100)}, "has no 'ecg_rate'"),
        ("signals/p1.npz", {"eeg": np.zeros(100), "eeg_rate": 100.0}, "unknown stream 'eeg'"),
        ("signals/p1.npz", {"acc": np.zeros((10, 2)), "acc_rate": 32.0}, "must have shape (n,3)"),
        ("signals/p1.npz", {"ecg": np.full(10, np.nan), "ecg_rate": 250.0}, "NaN or infinite"),
        ("signals/p1.npz", {"ecg": np.zeros(10), "ecg_rate": -1.0}, "positive number of Hz"),
        ("notes/p1.txt", b"\xff\xfe\x00bad", "not UTF-8"),
    ]
    for rel, content, fragment in cases:
        path = h / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            np.savez(path, **content)
        else:
            path.write_bytes(content if content is not None else b"x")

        with pytest.raises(ByodError) as err:
            load_hospital_folder(h)

        assert err.value.file == str(path), rel
        assert fragment in str(err.value), (rel, str(err.value))
        path.unlink()


def test_dataset_json_declares_classes_and_extra_ehr(tmp_path):
    _write(tmp_path / "dataset.json", json.dumps({"classes": ["benign", "malignant"],
                                                  "ehr_extra": {"tumour_size": [20.0, 5.0]}}))
    _write(tmp_path / "a" / "labels.csv", "patient_id,label\nx1,malignant\n")
    _write(tmp_path / "a" / "ehr.csv", "patient_id,tumour_size,age\nx1,30,55\n")

    schema, hospitals = load_federation_folder(tmp_path)

    (rec,) = hospitals["a"]
    assert schema.classes == ("benign", "malignant") and rec.label == 1
    assert rec.ehr.shape == (EHR_DIM + 1,) and rec.ehr[-1] == pytest.approx(2.0) and rec.ehr[0] == pytest.approx(0.0)


@pytest.mark.parametrize("meta, fragment", [
    ("{not json", "not valid JSON"),
    (json.dumps({"classes": ["only"]}), "at least two distinct"),
    (json.dumps({"ehr_extra": {"age": [1, 2]}}), "clashes with a schema feature"),
    (json.dumps({"ehr_extra": {"x": [1, 0]}}), "std > 0"),
    (json.dumps({"colour": "blue"}), "expected an object"),
])
def test_bad_dataset_json(tmp_path, meta, fragment):
    _write(tmp_path / "dataset.json", meta)
    with pytest.raises(ByodError, match="dataset.json") as err:
        read_schema(tmp_path)
    assert fragment in str(err.value)


def test_federation_folder_without_hospitals(tmp_path):
    with pytest.raises(ByodError, match="no hospital folders"):
        load_federation_folder(tmp_path)
