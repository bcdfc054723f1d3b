"""The clinical data contract shared by simulators, the edge and the model.

Everything that two packages must agree on about the *content* of the data lives here:
the condition labels, the signal channels and model window, the EHR features (with their
LOINC codes, as FHIR Observations carry them) and the reference ranges used to
standardise them identically in every hospital, and :class:`PatientRecord`, the unit the
edge's store hands to training and inference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Latent condition of a simulated patient; the class index is the training label.
#: Carried at the edge as a FHIR Condition in the EHR feed.
CONDITIONS: tuple[str, ...] = ("normal", "cardiac", "respiratory")
NUM_CLASSES = len(CONDITIONS)

#: Modalities of the multimodal model, in the order of its modality mask.
MODALITIES: tuple[str, ...] = ("image", "ehr", "signals", "text")

#: Wearable streams: name -> (channels, nominal sample rate in Hz). ECG rate varies by
#: device (250-700 Hz); the edge resamples every stream to MODEL_SIGNAL_HZ.
SIGNAL_STREAMS: dict[str, tuple[int, float]] = {
    "ecg": (1, 250.0),
    "ppg": (1, 64.0),
    "eda": (1, 4.0),
    "acc": (3, 32.0),
    "temp": (1, 4.0),
    "resp": (1, 25.0),
}
#: Channels of a model signal window, in order (acc expands to three axes).
SIGNAL_CHANNELS: tuple[str, ...] = ("ecg", "ppg", "eda", "acc_x", "acc_y", "acc_z", "temp", "resp")
#: Reference centre and scale of each channel of a model window, in the units the edge
#: stores (ECG mV and PPG band-passed, so centred on 0; EDA in microsiemens; acceleration
#: in g, z along gravity; skin temperature in degrees C; respiration belt arbitrary units).
#: The model standardises every window with them (``protocols.model.SignalLSTM``), as the
#: EHR is with ``EHR_FEATURES``: raw, a skin temperature near 34 dwarfs an ECG of 0.1 mV.
SIGNAL_REFERENCE: dict[str, tuple[float, float]] = {
    "ecg": (0.0, 0.15),
    "ppg": (0.0, 0.3),
    "eda": (2.5, 1.0),
    "acc_x": (0.0, 0.1),
    "acc_y": (0.0, 0.1),
    "acc_z": (1.0, 0.1),
    "temp": (34.0, 1.5),
    "resp": (0.0, 0.6),
}
MODEL_SIGNAL_HZ = 25.0
WINDOW_SECONDS = 8.0
WINDOW_SAMPLES = int(MODEL_SIGNAL_HZ * WINDOW_SECONDS)  # 200

#: Side of the square, single-channel image the model sees after normalisation.
IMAGE_SIZE = 64

#: EHR features: name -> (LOINC code, reference mean, reference std). ``sex`` comes from
#: FHIR Patient.gender (male=1, female=0) and has no LOINC code.
EHR_FEATURES: dict[str, tuple[str | None, float, float]] = {
    "age": ("30525-0", 55.0, 18.0),
    "sex": (None, 0.5, 0.5),
    "heart_rate": ("8867-4", 80.0, 15.0),
    "resp_rate": ("9279-1", 16.0, 4.0),
    "body_temp": ("8310-5", 37.0, 0.7),
    "spo2": ("59408-5", 96.0, 3.0),
    "systolic_bp": ("8480-6", 125.0, 18.0),
    "diastolic_bp": ("8462-4", 80.0, 11.0),
    "wbc": ("6690-2", 8.0, 3.0),
    "lactate": ("2524-7", 1.5, 1.0),
    "crp": ("1988-5", 10.0, 20.0),
    "troponin": ("6598-7", 0.02, 0.05),
}
EHR_DIM = len(EHR_FEATURES)
LOINC_TO_FEATURE: dict[str, str] = {code: name for name, (code, _, _) in EHR_FEATURES.items() if code}


def standardise_ehr(values: dict[str, float]) -> np.ndarray:
    """Features in EHR_FEATURES order, standardised with the shared reference ranges.

    A missing feature becomes NaN; the model treats NaN as absent.
    """
    out = np.full(EHR_DIM, np.nan, dtype=np.float32)
    for i, (name, (_, mean, std)) in enumerate(EHR_FEATURES.items()):
        if name in values and values[name] is not None:
            out[i] = (float(values[name]) - mean) / std
    return out


@dataclass
class PatientRecord:
    """Everything the edge holds for one patient, preprocessed and ready for the model.

    Any modality may be ``None`` (missing). ``signal_windows`` has shape
    ``(n_windows, WINDOW_SAMPLES, len(SIGNAL_CHANNELS))`` with zeros in channels the
    patient's devices did not record; ``image`` is ``(IMAGE_SIZE, IMAGE_SIZE)`` float32,
    normalised to zero mean and unit variance; ``ehr`` is ``(EHR_DIM,)`` from
    :func:`standardise_ehr`; ``label`` is an index into CONDITIONS, or ``None`` if unknown.
    """

    patient_id: str
    hospital: str
    label: int | None = None
    image: np.ndarray | None = None
    ehr: np.ndarray | None = None
    signal_windows: np.ndarray | None = None
    note: str | None = None
    extra: dict = field(default_factory=dict)

    def modalities(self) -> tuple[str, ...]:
        present = {
            "image": self.image is not None,
            "ehr": self.ehr is not None,
            "signals": self.signal_windows is not None and len(self.signal_windows) > 0,
            "text": bool(self.note),
        }
        return tuple(m for m in MODALITIES if present[m])
