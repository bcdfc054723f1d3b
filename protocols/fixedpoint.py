"""Fixed-point encoding of real tensors in the ring Z_2^64 (CrypTen's encoding).

A real ``x`` is stored as the 64-bit integer ``round(x * 2**16)``; arithmetic on the
encoded values wraps modulo 2^64, which numpy's int64 array arithmetic does natively.
CrypTen's ``FixedPointEncoder`` uses the same base (2) and precision (16 bits) and the same
``torch.long`` storage, so arrays encoded here (and additive shares of them) load
straight into a CrypTen ``ArithmeticSharedTensor``. (CrypTen truncates where this module
rounds to nearest; both are valid encodings at the same scale, rounding halves the error.)
"""
from __future__ import annotations

import numpy as np

from protocols.errors import ShareError

FRAC_BITS = 16
SCALE = 1 << FRAC_BITS
RING_BITS = 64
#: Largest magnitude that may be encoded: a sum of many encoded values must still stay far
#: below 2^63 to decode unambiguously, so single values are kept under 2^62 / SCALE.
MAX_ABS = float(1 << (RING_BITS - 2 - FRAC_BITS))


def encode(x: np.ndarray | float, scale_by: int = 1) -> np.ndarray:
    """``round(x * scale_by * 2**16)`` as int64; raises :class:`ShareError` when out of range.

    ``scale_by`` is an exact integer multiplier applied before rounding (a hospital's
    sample count ``n_k`` in weighted FedAvg), so the product is encoded once.
    """
    arr = np.asarray(x, dtype=np.float64)
    if scale_by != 1:
        arr = arr * float(scale_by)
    if not np.all(np.isfinite(arr)):
        raise ShareError("not_finite", "cannot encode NaN or infinity")
    peak = float(np.max(np.abs(arr))) if arr.size else 0.0
    if peak >= MAX_ABS:
        raise ShareError("out_of_range", f"|value| {peak:.3g} >= {MAX_ABS:.3g} cannot be encoded")
    return np.rint(arr * SCALE).astype(np.int64)


def decode(v: np.ndarray, divisor: int | float = 1) -> np.ndarray:
    """Back to float64: ``v / 2**16 / divisor`` (interpreting ring elements as signed)."""
    arr = np.asarray(v)
    if arr.dtype != np.int64:
        raise ShareError("wrong_dtype", f"expected int64 ring elements, got {arr.dtype}")
    return arr.astype(np.float64) / (SCALE * float(divisor))
