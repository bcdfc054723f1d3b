"""Latent physiology of a simulated patient: condition-dependent parameters that every modality reads.

Each parameter is ``normal + expression * (condition mean - normal) + spread * noise``: the
condition shifts the mean, and person-to-person spread makes classes overlap, so no single
modality separates them perfectly. ``expression`` is the patient's severity times a factor
of the parameter's organ system (:data:`SYSTEMS`), drawn once per patient and system
(log-normal, sd :data:`SYSTEM_SPREAD` in log): as in real patients, a disease shows strongly in
one system and faintly in another (a pneumonia with a dense consolidation but little fever,
an ischaemic heart with ST changes but a normal-sized heart). Modalities read different
systems, so their evidence is partly complementary: one that misses a patient's condition
is not always missed by the others. What each modality reveals, and how much, is in
``simulators/README.md``.
"""
from __future__ import annotations

import numpy as np

from protocols.schema import CONDITIONS

#: parameter -> (mean per condition in CONDITIONS order, person-to-person sd)
PARAMS: dict[str, tuple[tuple[float, float, float], float]] = {
    "heart_rate": ((72.0, 96.0, 90.0), 11.0),
    "hr_irregularity": ((0.03, 0.14, 0.05), 0.03),
    "st_shift": ((0.0, 0.16, 0.0), 0.06),
    "qrs_width": ((1.0, 1.45, 1.0), 0.15),
    "resp_rate": ((14.0, 17.0, 24.0), 3.5),
    "resp_amp": ((1.0, 0.9, 0.6), 0.18),
    "resp_irregularity": ((0.05, 0.08, 0.25), 0.05),
    "spo2": ((97.5, 95.0, 91.5), 1.8),
    "body_temp": ((36.8, 36.9, 38.0), 0.45),
    "eda_level": ((2.0, 3.0, 2.6), 0.8),
    "scr_per_min": ((2.0, 5.0, 4.0), 1.2),
    "activity": ((0.05, 0.03, 0.04), 0.015),
    "cough_per_min": ((0.1, 0.3, 3.0), 0.6),
    "ppg_amp": ((1.0, 0.62, 0.85), 0.18),
    "age": ((50.0, 67.0, 60.0), 15.0),
    "systolic_bp": ((121.0, 139.0, 126.0), 12.0),
    "diastolic_bp": ((77.0, 87.0, 78.0), 8.0),
    "wbc": ((7.0, 8.3, 12.5), 2.3),
    "lactate": ((1.2, 2.2, 1.9), 0.55),
    "log_crp": ((1.5, 2.3, 3.6), 0.7),
    "log_troponin": ((-4.6, -1.6, -4.0), 0.9),
    "heart_size": ((1.0, 1.33, 1.02), 0.08),
    "opacity": ((0.08, 0.15, 0.9), 0.2),
}
#: parameter -> organ system; one expression factor per system and patient.
SYSTEMS: dict[str, str] = {
    "heart_rate": "haemodynamic", "ppg_amp": "haemodynamic", "systolic_bp": "haemodynamic",
    "diastolic_bp": "haemodynamic",
    "hr_irregularity": "conduction", "st_shift": "conduction", "qrs_width": "conduction",
    "heart_size": "cardiac_structure",
    "log_troponin": "myocardial_injury",
    "resp_rate": "ventilation", "resp_amp": "ventilation", "resp_irregularity": "ventilation",
    "spo2": "ventilation", "cough_per_min": "airway",
    "opacity": "lung_parenchyma",
    "body_temp": "inflammation", "wbc": "inflammation", "log_crp": "inflammation", "lactate": "inflammation",
    "eda_level": "autonomic", "scr_per_min": "autonomic", "activity": "autonomic",
    "age": "demographic",
}
#: Standard deviation of the log of a system's expression factor (0: every system shows the
#: patient's one severity). 0.6 cost every modality 4-8 points of a logistic regression's
#: accuracy and left the small-cohort training test (tests/edge_server/test_training.py)
#: below its margin, for no larger fusion gain; 0.35 costs 0-4 points.
SYSTEM_SPREAD = 0.35

_LOWER = {"heart_rate": 40.0, "hr_irregularity": 0.0, "qrs_width": 0.7, "resp_rate": 6.0, "resp_amp": 0.2,
          "resp_irregularity": 0.0, "spo2": 80.0, "eda_level": 0.3, "scr_per_min": 0.0, "activity": 0.005,
          "cough_per_min": 0.0, "ppg_amp": 0.2, "age": 18.0, "wbc": 2.0, "lactate": 0.4, "heart_size": 0.8,
          "opacity": 0.0}
_UPPER = {"spo2": 100.0, "heart_rate": 170.0, "age": 95.0, "resp_rate": 40.0}


def draw_physiology(condition: str, severity: float, rng: np.random.Generator) -> dict[str, float]:
    """Parameters of one patient with ``condition`` at ``severity`` (about 0.3-1.3)."""
    c = CONDITIONS.index(condition)
    systems = sorted(set(SYSTEMS.values()))
    factor = dict(zip(systems, np.exp(SYSTEM_SPREAD * rng.standard_normal(len(systems)) - SYSTEM_SPREAD ** 2 / 2)))
    out: dict[str, float] = {}
    for name, (means, sd) in PARAMS.items():
        expression = severity * factor[SYSTEMS[name]]
        value = means[0] + expression * (means[c] - means[0]) + sd * rng.standard_normal()
        out[name] = float(np.clip(value, _LOWER.get(name, -np.inf), _UPPER.get(name, np.inf)))
    out["sex"] = float(rng.random() < 0.5)
    return out
