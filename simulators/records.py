"""Synthetic :class:`PatientRecord` builder for model and training tests and benchmarks.

Every modality carries a weak, label-dependent signal (so a model can learn from any one of
them) plus noise; ``modalities`` and ``p_missing`` control which ones a record has.
"""
from __future__ import annotations

import numpy as np

from protocols.schema import (
    CONDITIONS,
    EHR_DIM,
    IMAGE_SIZE,
    MODALITIES,
    SIGNAL_CHANNELS,
    WINDOW_SAMPLES,
    PatientRecord,
)

#: Note wording per condition index (shared with stores built for tests).
NOTES = {
    0: ["routine check up no complaints", "patient well vitals stable", "no acute distress reported"],
    1: ["chest pain radiating to left arm", "palpitations and irregular heartbeat", "elevated troponin angina"],
    2: ["shortness of breath and cough", "wheezing low oxygen saturation", "productive cough fever dyspnea"],
}


def make_record(rng: np.random.Generator, label: int, idx: int, hospital: str = "h0",
                modalities: tuple[str, ...] = MODALITIES, n_windows: int = 2,
                strength: float = 1.0) -> PatientRecord:
    """One patient of class ``label`` with the given modalities present."""
    image = ehr = windows = note = None
    if "image" in modalities:
        image = rng.normal(0, 1, (IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
        q = IMAGE_SIZE // 2
        # A bright quadrant whose position is the class.
        r, c = divmod(label, 2)
        image[r * q:(r + 1) * q, c * q:(c + 1) * q] += strength
    if "ehr" in modalities:
        ehr = rng.normal(0, 1, EHR_DIM).astype(np.float32)
        ehr[2 + label] += 1.5 * strength
        ehr[rng.random(EHR_DIM) < 0.2] = np.nan  # some features unmeasured
    if "signals" in modalities:
        t = np.arange(WINDOW_SAMPLES) / 25.0
        windows = rng.normal(0, 0.5, (n_windows, WINDOW_SAMPLES, len(SIGNAL_CHANNELS))).astype(np.float32)
        freq = (1.0, 1.8, 0.6)[label]
        windows[:, :, 0] += strength * np.sin(2 * np.pi * freq * t).astype(np.float32)
        windows[:, :, 7] += strength * 0.5 * label
    if "text" in modalities:
        note = str(rng.choice(NOTES[label]))
    return PatientRecord(patient_id=f"{hospital}-p{idx:04d}", hospital=hospital, label=label, image=image,
                         ehr=ehr, signal_windows=windows, note=note)


def make_records(n: int, seed: int = 0, hospital: str = "h0", p_missing: float = 0.3,
                 modalities: tuple[str, ...] = MODALITIES, strength: float = 1.0) -> list[PatientRecord]:
    """``n`` patients with balanced labels; each modality missing with ``p_missing`` (one always kept)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % len(CONDITIONS)
        present = tuple(m for m in modalities if rng.random() >= p_missing) or (modalities[rng.integers(len(modalities))],)
        out.append(make_record(rng, label, i, hospital, present, strength=strength))
    return out
