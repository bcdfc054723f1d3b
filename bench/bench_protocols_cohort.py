"""Signal-frame codec and cohort generator speed on one core, against baselines measured in the same run.

Baselines: for decoding, a bare ``np.frombuffer`` of the same sample bytes (no header, CRC
or validation); for generation, ``numpy`` drawing the same number of random samples.
Codec rates are per second of this process's CPU time (best of three), so that other load
on a shared machine inflates them less than wall-clock rates would.
"""
from __future__ import annotations

import time

import numpy as np

from protocols.messages import SignalFrame, from_wire, to_wire
from protocols.topics import Topic
from simulators.cohort import generate_cohort


def rate(fn, n, repeats=3):
    """Calls per second of CPU time (best of ``repeats``): on a shared machine, wall time
    mostly measures the neighbours; CPU time of this process is what one core can do."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = max(best, n / max(time.process_time() - t0, 1e-9))
    return best


def main() -> None:
    topic = Topic("h1", "wearable", "w-1", "ecg")
    samples = np.random.default_rng(0).normal(size=(500, 1)).astype(np.float32)
    frame = SignalFrame.build("w-1", "ecg", 1, 1.7e9, 500.0, samples)
    wire = to_wire(frame)
    raw = samples.tobytes()
    n = 20_000
    dec = rate(lambda: from_wire(topic, wire), n)
    base = rate(lambda: np.frombuffer(raw, dtype="<f4").reshape(500, 1), n)
    enc = rate(lambda: to_wire(SignalFrame.build("w-1", "ecg", 1, 1.7e9, 500.0, samples)), n)
    print(f"frame decode (500-sample ECG, CRC + validation): {dec:,.0f} frames/s; "
          f"bare frombuffer {base:,.0f}/s; ratio {dec / base:.3f}")
    acc_topic = topic.with_stream("acc")
    acc = np.random.default_rng(1).normal(size=(32, 3)).astype(np.float32)
    acc_wire = to_wire(SignalFrame.build("w-1", "acc", 1, 1.7e9, 32.0, acc))
    acc_dec = rate(lambda: from_wire(acc_topic, acc_wire), n)
    acc_raw = acc.tobytes()
    acc_base = rate(lambda: np.frombuffer(acc_raw, dtype="<f4").reshape(32, 3), n)
    print(f"frame decode (32x3 accelerometer): {acc_dec:,.0f} frames/s; "
          f"bare frombuffer {acc_base:,.0f}/s; ratio {acc_dec / acc_base:.3f}")
    print(f"frame build + encode: {enc:,.0f} frames/s")
    t0 = time.perf_counter()
    cohort = generate_cohort("bench", 50, seed=1, duration_s=60.0, index=0)
    gen = time.perf_counter() - t0
    total = sum(x.size for p in cohort for _, x in p.streams.values())
    t0 = time.perf_counter()
    np.random.default_rng(0).standard_normal(total).astype(np.float32)
    draw = time.perf_counter() - t0
    print(f"generate_cohort 50 patients x 60 s, all modalities: {gen:.2f} s "
          f"({total:,} signal samples); drawing as many normals: {draw:.3f} s; ratio {gen / draw:.1f}")


if __name__ == "__main__":
    main()
