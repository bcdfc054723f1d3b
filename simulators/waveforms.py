"""Vectorised wearable waveforms (ECG, PPG, EDA, ACC, temperature, respiration) from a patient's physiology.

No per-sample or per-beat Python loops: beats are placed with a cumulative sum, each
sample finds its beat with ``searchsorted`` and the ECG/PPG morphology is a sum of
Gaussians over the phase within the beat (the shape model of McSharry et al., 2003,
"A dynamical model for generating synthetic electrocardiogram signals", evaluated in
closed form rather than integrated). We use this rather than neurokit2's simulators to keep
cohort generation dependency-free and vectorised (see BENCHMARKS.md for its speed);
neurokit2 was not benchmarked against it.
"""
from __future__ import annotations

import numpy as np

from protocols.schema import SIGNAL_STREAMS

# ECG waves: (phase of centre within the RR interval, width, amplitude in mV)
_ECG_WAVES = ((0.10, 0.025, 0.12), (0.22, 0.010, -0.12), (0.25, 0.012, 1.0), (0.28, 0.012, -0.22),
              (0.50, 0.050, 0.30))
PTT_S = 0.22  # pulse transit time: the PPG pulse lags the R peak


def _beats(duration: float, phys: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mean_rr = 60.0 / phys["heart_rate"]
    n = int(duration / mean_rr * 1.5) + 8
    rr = mean_rr * (1.0 + phys["hr_irregularity"] * rng.standard_normal(n))
    rr = np.clip(rr, 0.28, 2.0)
    onsets = np.concatenate([[-rng.uniform(0, mean_rr) - 1.0], rr[:-1]]).cumsum()
    return onsets, rr


def _phase(t: np.ndarray, onsets: np.ndarray, rr: np.ndarray) -> np.ndarray:
    i = np.clip(np.searchsorted(onsets, t, side="right") - 1, 0, len(onsets) - 1)
    return (t - onsets[i]) / rr[i]


def _lowpass_noise(n: int, width: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(n + width)
    kernel = np.hanning(width + 2)[1:-1]
    y = np.convolve(x, kernel / np.sqrt((kernel ** 2).sum()), mode="valid")[:n]
    return y


def ecg(t, onsets, rr, phys, noise, rng):
    ph = _phase(t, onsets, rr)
    out = np.zeros_like(t)
    for k, (mu, sigma, amp) in enumerate(_ECG_WAVES):
        if 1 <= k <= 3:
            sigma = sigma * phys["qrs_width"]
        out += amp * np.exp(-((ph - mu) ** 2) / (2 * sigma ** 2))
    out += phys["st_shift"] * np.exp(-((ph - 0.37) ** 2) / (2 * 0.05 ** 2))
    breathing = 2 * np.pi * phys["resp_rate"] / 60.0 * t
    out += 0.1 * np.sin(breathing) + 0.02 * noise * np.sin(2 * np.pi * 50.0 * t)
    return out + 0.04 * noise * rng.standard_normal(t.size)


def ppg(t, onsets, rr, phys, noise, rng):
    ph = _phase(t - PTT_S, onsets, rr)
    pulse = np.exp(-((ph - 0.3) ** 2) / (2 * 0.08 ** 2)) + 0.4 * np.exp(-((ph - 0.55) ** 2) / (2 * 0.07 ** 2))
    breathing = 1.0 + 0.15 * np.sin(2 * np.pi * phys["resp_rate"] / 60.0 * t)
    return phys["ppg_amp"] * pulse * breathing + 0.05 * noise * rng.standard_normal(t.size)


def resp(t, phys, noise, rng):
    rate = 1.0 / float(t[1] - t[0]) if t.size > 1 else 25.0
    freq = phys["resp_rate"] / 60.0 * (1.0 + phys["resp_irregularity"] * _lowpass_noise(t.size, max(3, int(4 * rate)), rng))
    phase = 2 * np.pi * np.cumsum(freq) / rate
    amp = phys["resp_amp"] * (1.0 + 0.5 * phys["resp_irregularity"] * _lowpass_noise(t.size, max(3, int(6 * rate)), rng))
    return amp * np.sin(phase) + 0.05 * noise * rng.standard_normal(t.size)


def eda(t, phys, noise, rng):
    rate = 1.0 / float(t[1] - t[0]) if t.size > 1 else 4.0
    impulses = (rng.random(t.size) < phys["scr_per_min"] / 60.0 / rate) * rng.uniform(0.1, 0.6, t.size)
    k = np.arange(int(20 * rate)) / rate
    kernel = np.exp(-k / 4.0) - np.exp(-k / 0.75)
    scr = np.convolve(impulses, kernel, mode="full")[: t.size]
    drift = 0.15 * _lowpass_noise(t.size, max(3, int(30 * rate)), rng)
    return phys["eda_level"] + scr + drift + 0.02 * noise * rng.standard_normal(t.size)


def acc(t, phys, noise, rng):
    rate = 1.0 / float(t[1] - t[0]) if t.size > 1 else 32.0
    out = np.zeros((t.size, 3))
    out[:, 2] = 1.0
    for axis in range(3):
        out[:, axis] += phys["activity"] * _lowpass_noise(t.size, max(3, int(rate / 2)), rng)
    coughs = (rng.random(t.size) < phys["cough_per_min"] / 60.0 / rate).astype(float)
    burst = np.exp(-np.arange(int(0.5 * rate)) / (0.08 * rate)) * np.sin(np.arange(int(0.5 * rate)) * 2.1)
    jolt = np.convolve(coughs, burst, mode="full")[: t.size] * 0.4
    out += jolt[:, None] * np.array([0.3, 1.0, 0.6])
    return out + 0.01 * noise * rng.standard_normal(out.shape)


def skin_temp(t, phys, noise, rng):
    rate = 1.0 / float(t[1] - t[0]) if t.size > 1 else 4.0
    drift = 0.1 * _lowpass_noise(t.size, max(3, int(60 * rate)), rng)
    return phys["body_temp"] - 2.5 + drift + 0.02 * noise * rng.standard_normal(t.size)


def wearable_streams(phys: dict, duration: float, rates: dict[str, float], noise: float,
                     rng: np.random.Generator) -> dict[str, tuple[float, np.ndarray]]:
    """stream -> (rate, float32 samples of shape (n, channels)) for the streams in ``rates``."""
    onsets, rr = _beats(duration, phys, rng)
    out: dict[str, tuple[float, np.ndarray]] = {}
    for stream, rate in rates.items():
        t = np.arange(int(round(duration * rate))) / rate
        if stream == "ecg":
            x = ecg(t, onsets, rr, phys, noise, rng)
        elif stream == "ppg":
            x = ppg(t, onsets, rr, phys, noise, rng)
        elif stream == "resp":
            x = resp(t, phys, noise, rng)
        elif stream == "eda":
            x = eda(t, phys, noise, rng)
        elif stream == "acc":
            x = acc(t, phys, noise, rng)
        elif stream == "temp":
            x = skin_temp(t, phys, noise, rng)
        else:
            raise ValueError(f"unknown stream {stream!r}")
        x = np.asarray(x, dtype=np.float32).reshape(t.size, SIGNAL_STREAMS[stream][0])
        out[stream] = (float(rate), x)
    return out
