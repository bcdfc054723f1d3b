"""Preprocessing, as pure functions: the edge daemon and in-process experiments call the same code.

Signals: ECG is band-passed (0.5-40 Hz) and notched at the mains frequencies (50 and 60 Hz,
where below Nyquist), PPG band-passed (0.5-8 Hz); every stream is then resampled to
``schema.MODEL_SIGNAL_HZ`` with a polyphase filter, laid on a common time line and cut into
windows of ``schema.WINDOW_SAMPLES`` x ``len(schema.SIGNAL_CHANNELS)`` (zeros for channels
not recorded). Filtering is zero-phase (``sosfiltfilt``) so waveform timing is unchanged.
Images are resized (antialiased) to ``schema.IMAGE_SIZE`` square and normalised; EHR
features are standardised with :func:`protocols.schema.standardise_ehr`.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from fractions import Fraction

import numpy as np
from PIL import Image
from scipy import signal

from protocols.errors import ConfigError
from protocols.fhir import bundle_condition, bundle_features
from protocols.schema import (
    CONDITIONS,
    IMAGE_SIZE,
    MODEL_SIGNAL_HZ,
    SIGNAL_CHANNELS,
    SIGNAL_STREAMS,
    WINDOW_SAMPLES,
    PatientRecord,
    standardise_ehr,
)

log = logging.getLogger(__name__)

BANDPASS_HZ: dict[str, tuple[float, float]] = {"ecg": (0.5, 40.0), "ppg": (0.5, 8.0)}
NOTCH_STREAMS: frozenset[str] = frozenset({"ecg"})
MAINS_HZ: tuple[float, ...] = (50.0, 60.0)
NOTCH_Q = 30.0
FILTER_ORDER = 4

#: Stream -> the columns of a model window it fills (acc fills its three axes).
STREAM_COLUMNS: dict[str, tuple[int, ...]] = {
    "ecg": (SIGNAL_CHANNELS.index("ecg"),),
    "ppg": (SIGNAL_CHANNELS.index("ppg"),),
    "eda": (SIGNAL_CHANNELS.index("eda"),),
    "acc": tuple(SIGNAL_CHANNELS.index(c) for c in ("acc_x", "acc_y", "acc_z")),
    "temp": (SIGNAL_CHANNELS.index("temp"),),
    "resp": (SIGNAL_CHANNELS.index("resp"),),
}

#: A text-embedding hook: note text -> 1-D float vector (stored in ``PatientRecord.extra``).
TextEmbedder = Callable[[str], np.ndarray]


def _as_2d(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x


def bandpass(x: np.ndarray, fs: float, low: float, high: float, order: int = FILTER_ORDER) -> np.ndarray:
    """Zero-phase Butterworth band-pass along axis 0; ``high`` is capped below Nyquist."""
    x = _as_2d(x)
    high = min(high, 0.45 * fs)
    if x.shape[0] < 2 or not 0 < low < high:
        return x - x.mean(axis=0) if x.shape[0] else x
    sos = signal.butter(order, [low, high], btype="bandpass", fs=fs, output="sos")
    padlen = min(3 * (2 * len(sos) + 1), x.shape[0] - 1)
    return signal.sosfiltfilt(sos, x, axis=0, padlen=padlen)


def notch(x: np.ndarray, fs: float, f0: float, q: float = NOTCH_Q) -> np.ndarray:
    """Zero-phase IIR notch at ``f0`` Hz; a no-op when ``f0`` is at or above Nyquist."""
    x = _as_2d(x)
    if f0 >= fs / 2 or x.shape[0] < 2:
        return x
    b, a = signal.iirnotch(f0, q, fs=fs)
    return signal.filtfilt(b, a, x, axis=0, padlen=min(3 * max(len(a), len(b)), x.shape[0] - 1))


def resample(x: np.ndarray, fs_in: float, fs_out: float = MODEL_SIGNAL_HZ) -> np.ndarray:
    """Polyphase resampling (with its anti-aliasing filter) from ``fs_in`` to ``fs_out`` Hz."""
    x = _as_2d(x)
    if fs_in == fs_out or x.shape[0] == 0:
        return x
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=0)


def clean_stream(stream: str, rate: float, samples: np.ndarray) -> np.ndarray:
    """One stream filtered as its kind needs and resampled to MODEL_SIGNAL_HZ: ``(n, channels)`` float32."""
    if stream not in SIGNAL_STREAMS:
        raise ValueError(f"unknown signal stream {stream!r}")
    x = _as_2d(samples)
    if stream in BANDPASS_HZ:
        x = bandpass(x, rate, *BANDPASS_HZ[stream])
    if stream in NOTCH_STREAMS:
        for f0 in MAINS_HZ:
            x = notch(x, rate, f0)
    return resample(x, rate).astype(np.float32)


def assemble_windows(streams: dict[str, tuple[float, np.ndarray]],
                     offsets: dict[str, float] | None = None) -> np.ndarray:
    """Model windows ``(n_windows, WINDOW_SAMPLES, len(SIGNAL_CHANNELS))`` from raw streams.

    ``streams`` maps a stream name to ``(sample_rate, samples)``; ``offsets`` gives each
    stream's start in seconds on a common time line (default: all start together).
    Channels no stream fills stay zero; a trailing partial window is dropped.
    """
    cleaned: dict[str, tuple[int, np.ndarray]] = {}
    for stream, (rate, samples) in streams.items():
        if samples is None or len(samples) == 0:
            continue
        start = int(round((offsets or {}).get(stream, 0.0) * MODEL_SIGNAL_HZ))
        cleaned[stream] = (max(start, 0), clean_stream(stream, rate, samples))
    total = max((start + len(x) for start, x in cleaned.values()), default=0)
    n_windows = total // WINDOW_SAMPLES
    out = np.zeros((n_windows * WINDOW_SAMPLES, len(SIGNAL_CHANNELS)), dtype=np.float32)
    for stream, (start, x) in cleaned.items():
        end = min(start + len(x), len(out))
        if end > start:
            out[start:end, list(STREAM_COLUMNS[stream])] = x[: end - start]
    return out.reshape(n_windows, WINDOW_SAMPLES, len(SIGNAL_CHANNELS))


def stream_from_frames(frames: Iterable[tuple[float, float, np.ndarray]]) -> tuple[float, float, np.ndarray]:
    """Join one device stream's frames ``(start_ts, rate, samples)`` into ``(rate, t0, samples)``.

    Frames are placed by their start time, so a lost frame leaves a zero-filled gap rather
    than shifting everything after it; frames at another rate than the first are skipped.
    """
    frames = sorted(frames, key=lambda f: f[0])
    if not frames:
        raise ValueError("no frames")
    t0, rate = frames[0][0], frames[0][1]
    placed: list[tuple[int, np.ndarray]] = []
    for start_ts, fs, samples in frames:
        if fs != rate:
            log.warning("frame at %.3f has rate %s Hz, stream started at %s Hz: skipped", start_ts, fs, rate)
            continue
        placed.append((int(round((start_ts - t0) * rate)), _as_2d(samples)))
    length = max(i + len(x) for i, x in placed)
    out = np.zeros((length, placed[0][1].shape[1]), dtype=np.float64)
    for i, x in placed:
        out[i:i + len(x)] = x
    return rate, t0, out


def preprocess_image(pixels: np.ndarray) -> np.ndarray:
    """``(IMAGE_SIZE, IMAGE_SIZE)`` float32, zero mean and unit variance (antialiased resize)."""
    arr = np.asarray(pixels, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {arr.shape}")
    if arr.shape != (IMAGE_SIZE, IMAGE_SIZE):
        arr = np.asarray(Image.fromarray(arr).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR),
                         dtype=np.float32)
    std = float(arr.std())
    return ((arr - arr.mean()) / std if std > 1e-8 else np.zeros_like(arr)).astype(np.float32)


def ehr_vector(features: dict[str, float]) -> np.ndarray:
    """EHR features (schema names) standardised with the shared reference ranges."""
    return standardise_ehr(features)


def label_of(condition: str | None) -> int | None:
    """Index of ``condition`` in schema.CONDITIONS, or None when unknown."""
    return CONDITIONS.index(condition) if condition in CONDITIONS else None


def load_text_embedder(spec: str | None) -> TextEmbedder | None:
    """The callable named by ``"package.module:function"``, or None for an empty spec."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"text embedder {spec!r} cannot be loaded: {err}") from err
    if not callable(fn):
        raise ConfigError(f"text embedder {spec!r} is not callable")
    return fn


def patient_record_from_raw(patient_id: str, hospital: str,
                            streams: dict[str, tuple[float, np.ndarray]] | None = None,
                            image: np.ndarray | None = None,
                            ehr_bundle: dict | list[dict] | None = None,
                            note: str | None = None,
                            *, offsets: dict[str, float] | None = None,
                            text_embedder: TextEmbedder | None = None,
                            label: int | None = None) -> PatientRecord:
    """A :class:`PatientRecord` from raw modalities, exactly as the edge builds it from its store.

    ``streams`` maps signal stream -> ``(sample_rate, samples)``; ``ehr_bundle`` is a FHIR
    R4 Bundle, or a list of them oldest first (later values win; the label comes from the
    newest Condition unless ``label`` is given).
    """
    windows = assemble_windows(streams, offsets) if streams else None
    ehr = None
    bundles = [ehr_bundle] if isinstance(ehr_bundle, dict) else list(ehr_bundle or [])
    if bundles:
        features: dict[str, float] = {}
        condition = None
        for bundle in bundles:
            features.update(bundle_features(bundle))
            condition = bundle_condition(bundle) or condition
        ehr = ehr_vector(features)
        if label is None:
            label = label_of(condition)
    extra: dict = {}
    if note and text_embedder is not None:
        extra["text_embedding"] = np.asarray(text_embedder(note), dtype=np.float32)
    return PatientRecord(
        patient_id=patient_id, hospital=hospital, label=label,
        image=None if image is None else preprocess_image(image),
        ehr=ehr,
        signal_windows=windows if windows is not None and len(windows) else None,
        note=note or None, extra=extra,
    )
