"""Non-wearable modalities of a simulated patient: chest radiograph, FHIR EHR bundle, clinical note."""
from __future__ import annotations

import numpy as np

from protocols.fhir import build_bundle
from protocols.schema import CONDITIONS

IMAGE_SIDE = 128
_YY, _XX = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE] / (IMAGE_SIDE - 1) * 2 - 1  # [-1, 1]


def _ellipse(cx, cy, rx, ry, soft=0.04):
    d = np.sqrt(((_XX - cx) / rx) ** 2 + ((_YY - cy) / ry) ** 2)
    return 1.0 / (1.0 + np.exp((d - 1.0) / soft))


def chest_image(phys: dict, gain: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """A 128x128 12-bit radiograph-like image (uint16): body, lungs, spine, heart, opacities.

    The heart's width follows ``heart_size`` (cardiomegaly in cardiac patients); blob-like
    opacities in the lung fields follow ``opacity`` (consolidation in respiratory ones).
    """
    dx, dy = rng.uniform(-0.06, 0.06, 2)
    body = _ellipse(dx, dy + 0.05, 0.92, 1.05)
    lungs = _ellipse(dx - 0.38, dy - 0.05, 0.28, 0.62) + _ellipse(dx + 0.38, dy - 0.05, 0.28, 0.62)
    spine = np.exp(-((_XX - dx) / 0.06) ** 2) * body
    ribs = 0.08 * (np.sin((_YY - dy) * 22.0) > 0.6) * lungs
    w = 0.27 * phys["heart_size"]
    heart = _ellipse(dx + 0.08, dy + 0.3, w, 0.24 * (0.5 + 0.5 * phys["heart_size"]))
    img = 0.55 * body - 0.4 * lungs + 0.25 * spine + ribs + 0.35 * heart
    n_blobs = rng.poisson(1.0 + 3.0 * phys["opacity"])
    for _ in range(n_blobs):
        side = rng.choice([-0.38, 0.38])
        bx, by = dx + side + rng.uniform(-0.15, 0.15), dy + rng.uniform(-0.45, 0.4)
        r = rng.uniform(0.06, 0.16)
        amp = 0.25 * min(phys["opacity"], 1.5) * rng.uniform(0.5, 1.2)
        img += amp * np.exp(-(((_XX - bx) ** 2 + (_YY - by) ** 2) / (2 * r ** 2))) * lungs
    img = gain * img + 0.03 * noise * rng.standard_normal(img.shape)
    return np.clip(600 + 2600 * img, 0, 4095).astype(np.uint16)


def ehr_features(phys: dict, rng: np.random.Generator) -> dict[str, float]:
    """Schema EHR feature values, as measured (with measurement noise) from the physiology."""
    return {
        "age": float(round(phys["age"])),
        "sex": phys["sex"],
        "heart_rate": float(round(phys["heart_rate"] + 3 * rng.standard_normal())),
        "resp_rate": float(round(phys["resp_rate"] + 1.5 * rng.standard_normal())),
        "body_temp": round(phys["body_temp"] + 0.15 * rng.standard_normal(), 1),
        "spo2": float(round(min(100.0, phys["spo2"] + 0.8 * rng.standard_normal()))),
        "systolic_bp": float(round(phys["systolic_bp"] + 4 * rng.standard_normal())),
        "diastolic_bp": float(round(phys["diastolic_bp"] + 3 * rng.standard_normal())),
        "wbc": round(max(1.0, phys["wbc"] + 0.5 * rng.standard_normal()), 1),
        "lactate": round(max(0.3, phys["lactate"] + 0.2 * rng.standard_normal()), 2),
        "crp": round(float(np.exp(phys["log_crp"] + 0.2 * rng.standard_normal())), 1),
        "troponin": round(float(np.exp(phys["log_troponin"] + 0.2 * rng.standard_normal())), 3),
    }


def ehr_bundle(patient_id: str, features: dict[str, float], condition: str, rng: np.random.Generator,
               drop: float = 0.1) -> dict:
    """A FHIR bundle; each lab/vital is missing with probability ``drop``."""
    kept = {k: v for k, v in features.items() if k in ("age", "sex") or rng.random() >= drop}
    return build_bundle(patient_id, kept, condition)


_SHARED = ("reports fatigue", "seen today in clinic", "history reviewed", "medications reconciled",
           "mild discomfort", "plan discussed with patient", "follow-up arranged", "appetite reduced",
           "sleep poor", "vitals recorded")
VOCAB: dict[str, tuple[str, ...]] = {
    "normal": ("no acute distress", "vitals within normal limits", "routine check-up", "lungs clear",
               "regular rate and rhythm", "unremarkable examination", "feels well", "no chest pain"),
    "cardiac": ("chest pain on exertion", "palpitations", "irregular rhythm", "raised troponin",
                "ST changes on ECG", "ankle edema", "systolic murmur", "breathless on exertion"),
    "respiratory": ("productive cough", "fever", "shortness of breath", "crackles at the bases",
                    "wheeze", "low oxygen saturation", "opacity on chest x-ray", "green sputum"),
}


def clinical_note(condition: str, phys: dict, rng: np.random.Generator, fidelity: float = 0.55) -> str:
    """A short templated note; each finding comes from the patient's condition with
    probability ``fidelity``, otherwise from another condition's or the shared vocabulary."""
    others = [c for c in CONDITIONS if c != condition]
    findings = []
    for _ in range(int(rng.integers(3, 6))):
        u = rng.random()
        if u < fidelity:
            pool = VOCAB[condition]
        elif u < fidelity + (1 - fidelity) / 2:
            pool = VOCAB[others[int(rng.integers(len(others)))]]
        else:
            pool = _SHARED
        findings.append(pool[int(rng.integers(len(pool)))])
    sex = "man" if phys["sex"] >= 0.5 else "woman"
    return f"{int(round(phys['age']))}-year-old {sex}. " + ". ".join(f[0].upper() + f[1:] for f in findings) + "."
