"""Hospital profiles: how sites differ (label mix, devices, noise, missing modalities), derived from the name."""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np

from protocols.schema import CONDITIONS, SIGNAL_STREAMS

ECG_RATES = (250.0, 360.0, 500.0, 512.0, 700.0)
#: Label mixes of the first hospitals (by index): each is skewed towards another condition.
_INDEXED_MIX = ((0.6, 0.25, 0.15), (0.25, 0.55, 0.2), (0.3, 0.15, 0.55))


def hospital_seed(hospital: str) -> int:
    """A stable 32-bit number for a hospital name (CRC-32, the same on every machine)."""
    return zlib.crc32(hospital.encode("utf-8"))


@dataclass(frozen=True)
class HospitalProfile:
    """What makes one hospital's data unlike another's."""

    hospital: str
    label_mix: tuple[float, ...]          # probability of each CONDITIONS entry
    ecg_rate: float                       # Hz, 250-700
    signal_noise: float                   # multiplies sensor noise
    image_gain: float                     # scanner contrast
    image_noise: float
    p_missing: dict[str, float]           # modality or wearable stream -> probability a patient lacks it

    def as_dict(self) -> dict:
        return asdict(self)

    def stream_rates(self) -> dict[str, float]:
        """The rate this hospital's wearables send each stream at: its ECG rate, the schema's otherwise."""
        return {s: (self.ecg_rate if s == "ecg" else rate) for s, (_, rate) in SIGNAL_STREAMS.items()}


def hospital_profile(hospital: str, index: int | None = None) -> HospitalProfile:
    """The profile of ``hospital``; ``index`` (0, 1, 2, ...) picks a distinct label skew for the
    first hospitals of a federation, otherwise everything derives from the name."""
    rng = np.random.default_rng(hospital_seed(hospital) if index is None else [hospital_seed(hospital), index])
    if index is not None and index < len(_INDEXED_MIX):
        mix = np.array(_INDEXED_MIX[index])
    else:
        mix = rng.dirichlet(np.full(len(CONDITIONS), 2.0)) * 0.7 + 0.3 / len(CONDITIONS)
    slot = index if index is not None else int(rng.integers(len(ECG_RATES)))
    ecg_rate = ECG_RATES[(slot * 2 + 1) % len(ECG_RATES)] if index is not None else ECG_RATES[slot]
    p_missing = {
        "image": float(rng.uniform(0.05, 0.3)),
        "text": float(rng.uniform(0.05, 0.4)),
        "ehr": float(rng.uniform(0.0, 0.05)),
        "signals": float(rng.uniform(0.0, 0.1)),
    }
    for stream in SIGNAL_STREAMS:
        if stream != "ecg":
            p_missing[stream] = float(rng.uniform(0.0, 0.3))
    return HospitalProfile(
        hospital=hospital, label_mix=tuple(float(p) for p in mix / mix.sum()), ecg_rate=ecg_rate,
        signal_noise=float(rng.uniform(0.6, 1.6)), image_gain=float(rng.uniform(0.8, 1.25)),
        image_noise=float(rng.uniform(0.6, 1.5)), p_missing=p_missing,
    )
