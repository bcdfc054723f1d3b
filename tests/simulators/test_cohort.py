"""The pure cohort generator: determinism, shapes, hospital differences, label signal in every modality."""
from __future__ import annotations

import numpy as np
import pytest

from protocols.messages import EhrRecord
from protocols.schema import CONDITIONS, SIGNAL_STREAMS
from simulators.clinical import VOCAB
from simulators.cohort import generate_cohort, hospital_profile


@pytest.fixture(scope="module")
def cohort():
    return generate_cohort("hosp-a", 90, seed=5, duration_s=20.0, index=0,
                           profile=hospital_profile("hosp-a", 0).__class__(
                               **{**hospital_profile("hosp-a", 0).as_dict(), "label_mix": (1 / 3, 1 / 3, 1 / 3)}))


def test_deterministic_under_seed_and_extends():
    a = generate_cohort("h1", 4, seed=11, duration_s=5.0)
    b = generate_cohort("h1", 6, seed=11, duration_s=5.0)
    c = generate_cohort("h1", 4, seed=12, duration_s=5.0)
    for x, y in zip(a, b):
        assert (x.patient_id, x.condition, x.note, x.ehr) == (y.patient_id, y.condition, y.note, y.ehr)
        assert x.streams.keys() == y.streams.keys()
        for s in x.streams:
            np.testing.assert_array_equal(x.streams[s][1], y.streams[s][1])
        assert (x.image is None and y.image is None) or np.array_equal(x.image, y.image)
    assert any(x.ehr != z.ehr for x, z in zip(a, c))


def test_shapes_rates_and_types(cohort):
    profile = hospital_profile("hosp-a", 0)
    assert 250 <= profile.ecg_rate <= 700
    for p in cohort:
        assert p.label == CONDITIONS.index(p.condition)
        for stream, (rate, x) in p.streams.items():
            assert x.dtype == np.float32 and np.isfinite(x).all()
            assert x.shape == (int(20 * rate), SIGNAL_STREAMS[stream][0])
            assert rate == (profile.ecg_rate if stream == "ecg" else SIGNAL_STREAMS[stream][1])
        if p.image is not None:
            assert p.image.shape == (128, 128) and p.image.dtype == np.uint16
        if p.ehr is not None:
            assert EhrRecord.from_bundle(p.ehr).condition() == p.condition
    assert set(p.devices["wearable"] for p in cohort).__len__() == len(cohort)


def test_hospitals_differ():
    profiles = [hospital_profile(f"h{i}", i) for i in range(3)]
    assert len({p.ecg_rate for p in profiles}) == 3
    assert len({int(np.argmax(p.label_mix)) for p in profiles}) == 3     # non-IID label skew
    named = hospital_profile("st-marys")
    assert named == hospital_profile("st-marys") and named != hospital_profile("st-johns")
    big = generate_cohort("h0", 60, seed=1, duration_s=2.0, index=0)
    assert any(p.image is None for p in big) and any(p.note is None for p in big)     # missing modalities
    assert any(len(p.streams) < len(SIGNAL_STREAMS) for p in big if p.streams)


def _separates(values: dict[str, list[float]], a: str, b: str) -> float:
    """Standardised difference of class means (Cohen's d)."""
    x, y = np.asarray(values[a]), np.asarray(values[b])
    return abs(x.mean() - y.mean()) / np.sqrt((x.var() + y.var()) / 2 + 1e-12)


def _by_class(cohort, fn):
    out = {c: [] for c in CONDITIONS}
    for p in cohort:
        v = fn(p)
        if v is not None:
            out[p.condition].append(v)
    return out


def _beat_rate(p):
    if "ppg" not in p.streams:
        return None
    rate, x = p.streams["ppg"]
    spec = np.abs(np.fft.rfft(x[:, 0] - x[:, 0].mean()))
    freqs = np.fft.rfftfreq(x.shape[0], 1 / rate)
    band = (freqs > 0.6) & (freqs < 3.0)
    return freqs[band][np.argmax(spec[band])] * 60


def test_label_signal_in_every_modality_but_no_modality_is_perfect(cohort):
    checks = {
        # wearables: ECG ST segment level, PPG beat rate, respiration rate, EDA level, coughs in ACC
        "ecg": (_by_class(cohort, lambda p: float(np.percentile(p.streams["ecg"][1], 75)) if p.streams else None),
                "normal", "cardiac"),
        "ppg": (_by_class(cohort, _beat_rate), "normal", "cardiac"),
        "resp": (_by_class(cohort, lambda p: float(np.abs(np.diff(p.streams["resp"][1][:, 0])).mean() /
                                                    (p.streams["resp"][1].std() + 1e-6)) if "resp" in p.streams else None),
                 "normal", "respiratory"),
        "eda": (_by_class(cohort, lambda p: float(p.streams["eda"][1].mean()) if "eda" in p.streams else None),
                "normal", "cardiac"),
        "acc": (_by_class(cohort, lambda p: float(np.abs(np.diff(p.streams["acc"][1][:, 1])).max())
                          if "acc" in p.streams else None), "normal", "respiratory"),
        "temp": (_by_class(cohort, lambda p: float(p.streams["temp"][1].mean()) if "temp" in p.streams else None),
                 "normal", "respiratory"),
        "image_heart": (_by_class(cohort, lambda p: float((p.image[70:110, 40:90] > 2100).mean())
                                  if p.image is not None else None), "normal", "cardiac"),
        "image_lungs": (_by_class(cohort, lambda p: float(p.image[20:100, 10:50].astype(float).std())
                                  if p.image is not None else None), "normal", "respiratory"),
        "ehr": (_by_class(cohort, lambda p: EhrRecord.from_bundle(p.ehr).features().get("crp")
                          if p.ehr else None), "normal", "respiratory"),
        "text": (_by_class(cohort, lambda p: float(sum(w in p.note.lower() for w in VOCAB["cardiac"]))
                           if p.note else None), "normal", "cardiac"),
    }
    for name, (values, a, b) in checks.items():
        d = _separates(values, a, b)
        assert d > 0.5, f"{name}: no class signal (d={d:.2f})"
        lo, hi = np.percentile(values[a], [5, 95]), np.percentile(values[b], [5, 95])
        overlap = min(lo[1], hi[1]) - max(lo[0], hi[0])
        assert overlap > 0, f"{name}: classes do not overlap, the modality alone would be perfect"
