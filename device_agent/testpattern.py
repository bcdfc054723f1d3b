"""A device's built-in test pattern: deterministic, plausible samples for commissioning a link.

`iomt device` publishes it when there is no sensor attached (the edge stores it like any
other stream); realistic patients come from the simulators instead.
"""
from __future__ import annotations

import numpy as np

from protocols.schema import SIGNAL_STREAMS

#: stream -> (baseline, amplitude, frequency in Hz) per channel
_PATTERN = {
    "ecg": (0.0, 1.0, 1.2),
    "ppg": (0.0, 1.0, 1.2),
    "eda": (2.0, 0.2, 0.05),
    "acc": (0.0, 0.1, 1.8),
    "temp": (36.8, 0.05, 0.01),
    "resp": (0.0, 1.0, 0.25),
}


def test_pattern(stream: str, rate: float, start_s: float, seconds: float = 1.0) -> np.ndarray:
    """Samples of ``stream`` over ``[start_s, start_s + seconds)``, shape ``(n, channels)``."""
    channels = SIGNAL_STREAMS[stream][0]
    base, amp, freq = _PATTERN[stream]
    t = start_s + np.arange(int(round(rate * seconds))) / rate
    phase = np.arange(channels) * (2 * np.pi / 3)
    out = base + amp * np.sin(2 * np.pi * freq * t[:, None] + phase)
    if stream == "acc":
        out[:, 2] += 1.0  # gravity on z
    return out.astype(np.float32)
