"""Imaging studies: a single-frame greyscale image with DICOM metadata; on the wire, a DICOM file.

Encoding writes a DICOM Part 10 file (explicit VR little endian) with pydicom; decoding
accepts any single-image DICOM file pydicom can decode without extra codecs, so a study
from a real modality or PACS export is ingested like a simulated one.

Decoding is bounded before anything expands: a deflated dataset (transfer syntax
1.2.840.10008.1.2.1.99) is inflated at most to ``MAX_INFLATED_BYTES`` in a dry run before
pydicom inflates it, and the pixel data's decoded size (rows x columns x frames x samples x
bytes) is checked from the header before pixels are decoded (RLE expands too), so a small
payload cannot make the edge allocate gigabytes (reason ``oversized``).
"""
from __future__ import annotations

import io
import math
import zlib
from datetime import datetime, timezone

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from protocols.errors import ProtocolError
from protocols.ranges import check_text
from protocols.topics import ID_PATTERN

#: SOP classes we write: Computed Radiography for CR, Digital X-Ray for DX, else Secondary Capture.
SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MAX_PIXELS = 4096 * 4096
#: Most bytes a study may decode to: its inflated dataset, and its pixel data (all frames).
#: 64 MiB holds a 4096 x 4096 16-bit image or 8-bit RGB one.
MAX_DECODED_BYTES = 64 * 1024 * 1024
#: DICOM's UI value representation holds at most 64 characters (PS3.5 table 6.2-1).
MAX_UID_CHARS = 64
#: Most bytes a deflated dataset may inflate to: the pixel data and 4 MiB of other elements.
MAX_INFLATED_BYTES = MAX_DECODED_BYTES + 4 * 1024 * 1024
DEFLATED = "1.2.840.10008.1.2.1.99"
_INFLATE_CHUNK = 1024 * 1024
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
        if self.pixel_spacing is not None and not all(math.isfinite(v) for v in self.pixel_spacing):
            raise ProtocolError("bad_field", "pixel_spacing is not finite")
        for name in ("study_uid", "series_uid", "sop_instance_uid"):
            uid = getattr(self, name)
            if uid is not None and not 0 < len(uid) <= MAX_UID_CHARS:
                raise ProtocolError("bad_field", f"{name} must be 1-{MAX_UID_CHARS} characters")
        for name in ("patient_id", "study_uid", "modality", "body_part", "series_uid", "sop_instance_uid"):
            if getattr(self, name) is not None:
                check_text(getattr(self, name), name)
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


def _check_inflated_size(payload: bytes) -> None:
    """Raise ``oversized`` if a deflated dataset would inflate past ``MAX_INFLATED_BYTES``.

    pydicom inflates a deflated file's dataset in one ``zlib.decompress`` call, unbounded
    (a 1 MB payload can hold gigabytes of zeros); this dry run counts the output chunk by
    chunk without keeping it. The file meta group is read with pydicom's own reader.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(payload)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
    except Exception as err:  # pydicom raises many types for damaged files
        raise ProtocolError("bad_dicom", f"{type(err).__name__}: {str(err)[:120]}") from err
    if syntax != DEFLATED:
        return
    inflater, data, total = zlib.decompressobj(-zlib.MAX_WBITS), payload[fp.tell():], 0
    try:
        while True:
            chunk = inflater.decompress(data, _INFLATE_CHUNK)
            total += len(chunk)
            if total > MAX_INFLATED_BYTES:
                raise ProtocolError("oversized", f"deflated dataset inflates past {MAX_INFLATED_BYTES} bytes")
            data = inflater.unconsumed_tail
            if inflater.eof or (not data and len(chunk) < _INFLATE_CHUNK):
                return
    except zlib.error as err:
        raise ProtocolError("bad_dicom", f"deflated dataset: {err}") from err


def _check_pixel_size(ds) -> None:
    """Raise ``oversized`` if the header promises more pixels than we decode."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    if abs(rows * cols) > MAX_PIXELS:
        raise ProtocolError("oversized", f"{rows}x{cols} pixels > {MAX_PIXELS}")
    decoded = abs(rows * cols * frames * samples) * max(1, (abs(bits) + 7) // 8)
    if decoded > MAX_DECODED_BYTES:
        raise ProtocolError("oversized", f"pixel data decodes to {decoded} bytes > {MAX_DECODED_BYTES}")


def decode_study(device_id: str, payload: bytes) -> ImagingStudy:
    """The study in the DICOM file ``payload``; ``device_id`` comes from the topic."""
    import pydicom

    _check_inflated_size(payload)
    try:
        ds = pydicom.dcmread(io.BytesIO(payload), force=False)
        _check_pixel_size(ds)
        pixels = ds.pixel_array
    except ProtocolError:
        raise
    except Exception as err:  # pydicom raises many types for damaged files
        raise ProtocolError("bad_dicom", f"{type(err).__name__}: {str(err)[:120]}") from err
    try:
        return _study(device_id, ds, pixels)
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, IndexError) as err:  # odd header values
        raise ProtocolError("bad_dicom", f"{type(err).__name__}: {str(err)[:120]}") from err


def _study(device_id: str, ds, pixels: np.ndarray) -> ImagingStudy:
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
