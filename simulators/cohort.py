"""Pure cohort generator: a hospital's simulated patients with every modality, no MQTT.

Experiments and model tests call :func:`generate_cohort` in-process; `iomt simulate`
publishes the same patients through the device agent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protocols.schema import CONDITIONS
from simulators.clinical import chest_image, clinical_note, ehr_bundle, ehr_features
from simulators.physiology import draw_physiology
from simulators.profiles import HospitalProfile, hospital_profile, hospital_seed
from simulators.waveforms import wearable_streams

__all__ = ["SimPatient", "generate_cohort", "hospital_profile", "device_ids"]


@dataclass
class SimPatient:
    """One simulated patient. Missing modalities are ``None`` (or absent streams)."""

    patient_id: str
    hospital: str
    condition: str
    label: int
    severity: float
    streams: dict[str, tuple[float, np.ndarray]]   # stream -> (sample rate, (n, channels) float32)
    image: np.ndarray | None                        # (128, 128) uint16
    ehr: dict | None                                # FHIR R4 Bundle
    note: str | None
    devices: dict[str, str] = field(default_factory=dict)   # device class -> device id
    physiology: dict[str, float] = field(default_factory=dict)

    def modalities(self) -> tuple[str, ...]:
        present = {"image": self.image is not None, "ehr": self.ehr is not None,
                   "signals": bool(self.streams), "text": self.note is not None}
        return tuple(m for m, ok in present.items() if ok)


def device_ids(hospital: str, patient_index: int) -> dict[str, str]:
    """The devices that serve a patient: a personal wearable and the hospital's shared feeds."""
    return {"wearable": f"{hospital}-w{patient_index:04d}", "imaging": f"{hospital}-cr1",
            "ehr": f"{hospital}-ehr", "notes": f"{hospital}-notes"}


def generate_cohort(hospital: str, n_patients: int, seed: int, duration_s: float = 60.0,
                    index: int | None = None, profile: HospitalProfile | None = None) -> list[SimPatient]:
    """``n_patients`` patients of ``hospital``, deterministic in (hospital, seed, index).

    Patient ``i`` depends only on (hospital, seed, i) and the profile, so a larger cohort
    extends a smaller one.
    """
    profile = profile or hospital_profile(hospital, index)
    rates = profile.stream_rates()
    out = []
    for i in range(n_patients):
        rng = np.random.default_rng([seed, hospital_seed(hospital), i])
        label = int(rng.choice(len(CONDITIONS), p=profile.label_mix))
        condition = CONDITIONS[label]
        severity = float(rng.uniform(0.3, 1.3))
        phys = draw_physiology(condition, severity, rng)
        pid = f"{hospital}-p{i:04d}"
        miss = {k: rng.random() < p for k, p in profile.p_missing.items()}
        streams: dict[str, tuple[float, np.ndarray]] = {}
        if not miss["signals"] and duration_s > 0:
            wanted = {s: r for s, r in rates.items() if s == "ecg" or not miss.get(s, False)}
            streams = wearable_streams(phys, duration_s, wanted, profile.signal_noise, rng)
        image = None if miss["image"] else chest_image(phys, profile.image_gain, profile.image_noise, rng)
        feats = ehr_features(phys, rng)
        ehr = None if miss["ehr"] else ehr_bundle(pid, feats, condition, rng)
        note = None if miss["text"] else clinical_note(condition, phys, rng)
        out.append(SimPatient(patient_id=pid, hospital=hospital, condition=condition, label=label,
                              severity=severity, streams=streams, image=image, ehr=ehr, note=note,
                              devices=device_ids(hospital, i), physiology=phys))
    return out
