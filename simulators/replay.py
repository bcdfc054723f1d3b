"""Replay of a real physiological recording as a hospital's wearables (`iomt simulate --replay`).

Two sources:

- ``"pyphysio"``: the multimodal recording in the test data of the separately installed
  ``pyphysio`` package (GPL-3.0; install it with ``pip install --no-deps pyphysio==4.10.0``).
  It is read from that package at run time and never copied into this project. The file
  ``pyphysio/test_data/medical.txt.bz2`` holds four tab-separated columns ecg, eda, bvp, resp;
  pyphysio's own loader (``pyphysio.TestData``) reads it at 2048 Hz, which gives 120 s, the
  length its ``info_medical`` states (that file's "fsamp: 1024" disagrees with both).
- a path to an ``.npz`` file: one array per stream, named as our streams
  (:data:`protocols.schema.SIGNAL_STREAMS`: ``ecg``, ``ppg``, ``eda``, ``acc``, ``temp``,
  ``resp``), each of shape ``(n,)`` or ``(n, channels)`` with the stream's channel count and
  the same ``n``, finite numbers; plus a scalar ``fs``, the sample rate of every array in Hz.

Each stream is resampled (polyphase, :func:`scipy.signal.resample_poly`) to the rate a
hospital's wearable sends it at: the hospital profile's ECG rate, the schema's rate otherwise.
Patient ``i`` of ``n`` plays the recording from ``i * length / n`` seconds on, wrapping round
at the end. A recording carries no diagnosis, so replayed patients have no label, image, EHR
record or note.
"""
from __future__ import annotations

import bz2
import importlib.metadata
import logging
import math
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy import signal

from protocols.errors import IomtError
from protocols.schema import SIGNAL_STREAMS
from simulators.cohort import device_ids
from simulators.profiles import HospitalProfile, hospital_profile

log = logging.getLogger(__name__)

__all__ = ["PYPHYSIO", "PYPHYSIO_INSTALL", "Recording", "ReplayError", "ReplayPatient", "SourceMissing",
           "load_recording", "load_npz", "load_pyphysio", "replay_cohort", "resample_recording",
           "stream_rates", "save_npz"]

PYPHYSIO = "pyphysio"
PYPHYSIO_VERSION = "4.10.0"
PYPHYSIO_INSTALL = f"pip install --no-deps {PYPHYSIO}=={PYPHYSIO_VERSION}"
PYPHYSIO_FILE = "pyphysio/test_data/medical.txt.bz2"
#: Sample rate of the file, as ``pyphysio.TestData._fsamp_medical`` reads it.
PYPHYSIO_FS = 2048.0
#: The file's columns, in order, and the stream each one becomes here (bvp is a PPG).
PYPHYSIO_COLUMNS = (("ecg", "ecg"), ("eda", "eda"), ("bvp", "ppg"), ("resp", "resp"))
PYPHYSIO_LICENCE = (f"GPL-3.0 (test data of pyphysio {PYPHYSIO_VERSION}, Bizzego et al. 2019, "
                    "https://gitlab.com/a.bizzego/pyphysio; read from the installed package, not redistributed)")
NPZ_LICENCE = "supplied by the user"


class ReplayError(IomtError):
    """A recording that cannot be replayed (bad file, bad shape, unknown stream ...)."""


class SourceMissing(ReplayError):
    """The package that holds the recording is not installed."""


@dataclass(frozen=True)
class Recording:
    """A multimodal recording: every stream sampled at ``fs`` Hz for the same number of samples."""

    source: str
    licence: str
    fs: float
    streams: dict[str, np.ndarray]   # stream -> (n, channels) float64, n the same for all

    @property
    def n_samples(self) -> int:
        return next(iter(self.streams.values())).shape[0]

    @property
    def seconds(self) -> float:
        return self.n_samples / self.fs

    def describe(self) -> dict:
        return {"source": self.source, "licence": self.licence, "fs": self.fs, "seconds": self.seconds,
                "streams": sorted(self.streams)}


@dataclass
class ReplayPatient:
    """A wearable that plays part of a recording; what :func:`simulators.publish.publish_cohort` reads."""

    patient_id: str
    hospital: str
    offset_s: float                                  # where in the recording this patient starts
    streams: dict[str, tuple[float, np.ndarray]]     # stream -> (sample rate, (n, channels) float32)
    devices: dict[str, str] = field(default_factory=dict)
    image: None = None                               # a recording has no image, EHR record or note
    ehr: None = None
    note: None = None

    def modalities(self) -> tuple[str, ...]:
        return ("signals",) if self.streams else ()


def _checked(source: str, licence: str, fs: object, arrays: dict[str, object]) -> Recording:
    """A :class:`Recording` from raw arrays, or a :class:`ReplayError` saying what is wrong."""
    try:
        fs_value = float(np.asarray(fs).item())
    except (TypeError, ValueError) as err:
        raise ReplayError(f"{source}: fs must be one number, got {np.asarray(fs).shape} {np.asarray(fs).dtype}") \
            from err
    if not (math.isfinite(fs_value) and fs_value > 0):
        raise ReplayError(f"{source}: fs must be a finite rate > 0 Hz, got {fs_value!r}")
    if not arrays:
        raise ReplayError(f"{source}: no streams; expected some of {sorted(SIGNAL_STREAMS)}")
    streams: dict[str, np.ndarray] = {}
    for name, raw in arrays.items():
        if name not in SIGNAL_STREAMS:
            raise ReplayError(f"{source}: unknown stream {name!r}; streams are {sorted(SIGNAL_STREAMS)} (and fs)")
        x = np.asarray(raw)
        if x.dtype.kind not in "iuf":
            raise ReplayError(f"{source}: stream {name!r} holds {x.dtype}, not numbers")
        channels = SIGNAL_STREAMS[name][0]
        if x.ndim == 1 and channels == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != channels:
            want = "(n,) or (n, 1)" if channels == 1 else f"(n, {channels})"
            raise ReplayError(f"{source}: stream {name!r} has shape {x.shape}, expected {want}")
        x = x.astype(np.float64)
        if not np.isfinite(x).all():
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise ReplayError(f"{source}: stream {name!r} has {bad} NaN or infinite values")
        streams[name] = x
    lengths = {name: x.shape[0] for name, x in streams.items()}
    if len(set(lengths.values())) != 1:
        raise ReplayError(f"{source}: streams differ in length {lengths}; all share fs, so must share n")
    n = next(iter(lengths.values()))
    if n < fs_value:
        raise ReplayError(f"{source}: {n} samples at {fs_value:g} Hz is less than one second")
    return Recording(source=source, licence=licence, fs=fs_value, streams=streams)


def load_pyphysio() -> Recording:
    """The recording shipped in pyphysio's test data, read from the installed distribution.

    pyphysio is never imported (its import pulls dask, xarray, nilearn ...); the file is
    found through the distribution's metadata.
    """
    try:
        dist = importlib.metadata.distribution(PYPHYSIO)
    except importlib.metadata.PackageNotFoundError as err:
        raise SourceMissing(f"the {PYPHYSIO} package is not installed; install it (GPL-3.0, without its "
                            f"dependencies) with: {PYPHYSIO_INSTALL}") from err
    if dist.version != PYPHYSIO_VERSION:
        log.warning("pyphysio %s is installed; the replay was written against %s", dist.version, PYPHYSIO_VERSION)
    path = Path(dist.locate_file(PYPHYSIO_FILE))
    if not path.is_file():
        raise SourceMissing(f"pyphysio {dist.version} is installed but has no {PYPHYSIO_FILE}; "
                            f"install the version this replay knows with: {PYPHYSIO_INSTALL}")
    with bz2.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter="\t", dtype=np.float64, ndmin=2)
    if table.shape[1] != len(PYPHYSIO_COLUMNS):
        raise ReplayError(f"{path.name}: {table.shape[1]} columns, expected {len(PYPHYSIO_COLUMNS)}")
    arrays = {ours: table[:, i] for i, (_, ours) in enumerate(PYPHYSIO_COLUMNS)}
    return _checked(PYPHYSIO, PYPHYSIO_LICENCE, PYPHYSIO_FS, arrays)


def load_npz(path: Path | str) -> Recording:
    """A user's recording: see the module docstring for the format."""
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"{path}: no such file (give 'pyphysio' or an .npz path)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ReplayError(f"{path}: not a readable .npz without pickled objects ({err})") from err
    if "fs" not in arrays:
        raise ReplayError(f"{path}: no 'fs' array (the sample rate in Hz)")
    fs = arrays.pop("fs")
    return _checked(str(path), NPZ_LICENCE, fs, arrays)


def save_npz(path: Path | str, fs: float, streams: dict[str, np.ndarray]) -> None:
    """Write ``streams`` in the format :func:`load_npz` reads (checked first)."""
    rec = _checked(str(path), NPZ_LICENCE, fs, streams)
    np.savez(path, fs=np.float64(rec.fs), **rec.streams)


def load_recording(source: str | Path) -> Recording:
    """``"pyphysio"`` or a path to an ``.npz``."""
    return load_pyphysio() if str(source) == PYPHYSIO else load_npz(source)


#: The rate a wearable of a hospital sends each stream at (the same as :func:`generate_cohort`'s).
stream_rates = HospitalProfile.stream_rates


def _resample(x: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    if fs_in == fs_out:
        return x
    ratio = Fraction(fs_out / fs_in).limit_denominator(10_000)
    return signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=0)


def resample_recording(rec: Recording, rates: dict[str, float]) -> dict[str, tuple[float, np.ndarray]]:
    """Every stream of ``rec`` at ``rates[stream]``: ``stream -> (rate, (m, channels) float32)``."""
    return {name: (float(rates[name]), _resample(x, rec.fs, rates[name]).astype(np.float32))
            for name, x in rec.streams.items()}


def replay_cohort(rec: Recording, hospital: str, n_patients: int, duration_s: float,
                  index: int | None = None, profile: HospitalProfile | None = None) -> list[ReplayPatient]:
    """``n_patients`` wearables of ``hospital`` playing ``rec`` for ``duration_s`` seconds each.

    Patient ``i`` starts ``floor(i * seconds / n_patients)`` whole seconds into the recording
    (whole seconds keep one-second frames aligned with it) and wraps round at its end.
    """
    if n_patients < 0 or not math.isfinite(duration_s) or duration_s < 0:
        raise ValueError(f"need n_patients >= 0 and a finite duration >= 0, got {n_patients}, {duration_s}")
    profile = profile or hospital_profile(hospital, index)
    resampled = resample_recording(rec, stream_rates(profile))
    out = []
    for i in range(n_patients):
        offset_s = float(math.floor(i * rec.seconds / n_patients)) if n_patients else 0.0
        streams = {}
        for name, (rate, x) in resampled.items():
            n = int(round(duration_s * rate))
            if n:
                start = int(round(offset_s * rate))
                streams[name] = (rate, np.take(x, np.arange(start, start + n), axis=0, mode="wrap"))
        out.append(ReplayPatient(patient_id=f"{hospital}-p{i:04d}", hospital=hospital, offset_s=offset_s,
                                 streams=streams, devices=device_ids(hospital, i)))
    return out
