"""Imaging studies: a single-frame greyscale image with DICOM metadata; on the wire, a DICOM file.

Encoding writes a DICOM Part 10 file (explicit VR little endian) with pydicom; decoding
accepts any single-image DICOM file pydicom can decode without extra codecs, so a study
from a real modality or PACS export is ingested like a simulated one.
"""
from __future__ import annotations

import io
import math
from datetime import datetime, timezone

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from protocols.errors import ProtocolError
from protocols.topics import ID_PATTERN

#: SOP classes we write: Computed Radiography for CR, Digital X-Ray for DX, else Secondary Capture.
SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MAX_PIXELS = 4096 * 4096
_INT_KINDS = "iu"


class ImagingStudy(BaseModel):
    """One image of one study. ``pixels`` is 2-D, integer (as stored by modalities) or float."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")

    device_id: str
    patient_id: str
    study_uid: str
    modality: str = "CR"
    pixels: np.ndarray
    pixel_spacing: tuple[float, float] | None = None
    acquired_ts: float | None = None
    body_part: str | None = "CHEST"
    series_uid: str | None = None
    sop_instance_uid: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> "ImagingStudy":
        if not ID_PATTERN.fullmatch(self.device_id):
            raise ProtocolError("bad_field", f"device_id {self.device_id!r}")
        if not self.patient_id or len(self.patient_id) > 64:
            raise ProtocolError("bad_field", "patient_id must be 1-64 characters")
        if not isinstance(self.pixels, np.ndarray) or self.pixels.ndim != 2 or min(self.pixels.shape) < 1:
            raise ProtocolError("wrong_shape", f"pixels must be 2-D, got {getattr(self.pixels, 'shape', None)}")
        if self.pixels.size > MAX_PIXELS:
            raise ProtocolError("oversized", f"{self.pixels.shape} pixels")
        if self.pixels.dtype.kind == "f" and not np.isfinite(self.pixels).all():
            raise ProtocolError("non_finite", "pixels contain NaN or inf")
        if self.pixels.dtype.kind not in _INT_KINDS + "f":
            raise ProtocolError("bad_dtype", f"pixels are {self.pixels.dtype}")
        if self.acquired_ts is not None and not math.isfinite(self.acquired_ts):
            raise ProtocolError("bad_field", "acquired_ts is not finite")
        return self


def _stored_pixels(pixels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Pixels as unsigned 16-bit plus the (slope, intercept) that restore them."""
    if pixels.dtype.kind in _INT_KINDS and pixels.min() >= 0 and pixels.max() <= 0xFFFF:
        return pixels.astype("<u2"), 1.0, 0.0
    lo, hi = float(pixels.min()), float(pixels.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    return np.round((pixels - lo) / slope).astype("<u2"), slope, lo


def encode_study(study: ImagingStudy) -> bytes:
    """A DICOM Part 10 file holding ``study``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    sop_class = SOP_CLASSES.get(study.modality, SECONDARY_CAPTURE)
    sop_uid = study.sop_instance_uid or generate_uid(entropy_srcs=[study.study_uid, study.device_id])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = study.patient_id
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series_uid or generate_uid(entropy_srcs=[study.study_uid, "series"])
    ds.Modality = study.modality
    ds.DeviceSerialNumber = study.device_id
    if study.body_part:
        ds.BodyPartExamined = study.body_part
    if study.acquired_ts is not None:
        when = datetime.fromtimestamp(study.acquired_ts, tz=timezone.utc)
        ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
        ds.TimezoneOffsetFromUTC = "+0000"
        ds.StudyDate, ds.StudyTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    if study.pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:.6g}" for v in study.pixel_spacing]
    stored, slope, intercept = _stored_pixels(study.pixels)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    if (slope, intercept) != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _acquired_ts(ds) -> float | None:
    text = str(ds.get("AcquisitionDateTime", "") or "")
    if not text and ds.get("StudyDate"):
        text = str(ds.StudyDate) + str(ds.get("StudyTime", "") or "")
    if not text:
        return None
    text = text.split("+")[0].split("-")[0]
    for fmt in ("%Y%m%d%H%M%S.%f", "%Y%m%d%H%M%S", "%Y%m%d%H%M", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            continue
    return None


def decode_study(device_id: str, payload: bytes) -> ImagingStudy:
    """The study in the DICOM file ``payload``; ``device_id`` comes from the topic."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(payload), force=False)
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types for damaged files
        raise ProtocolError("bad_dicom", f"{type(err).__name__}: {str(err)[:120]}") from err
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 3:
        pixels = pixels.mean(axis=-1)
    elif pixels.ndim == 3:
        pixels = pixels[0]  # multi-frame: the first frame stands for the study
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if (slope, intercept) != (1.0, 0.0):
        pixels = pixels.astype(np.float64) * slope + intercept
    patient_id = str(ds.get("PatientID", "") or "")
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    if not patient_id or not study_uid:
        raise ProtocolError("bad_dicom", "PatientID and StudyInstanceUID are required")
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return ImagingStudy(
        device_id=device_id, patient_id=patient_id, study_uid=study_uid,
        modality=str(ds.get("Modality", "OT") or "OT"), pixels=np.asarray(pixels),
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
        acquired_ts=_acquired_ts(ds), body_part=str(ds.get("BodyPartExamined", "")) or None,
        series_uid=str(ds.get("SeriesInstanceUID", "")) or None,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")) or None,
    )
