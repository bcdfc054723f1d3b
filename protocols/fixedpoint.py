"""Fixed-point encoding of real tensors in the ring Z_2^64 (CrypTen's encoding).

A real ``x`` is stored as the 64-bit integer ``round(x * 2**16)``; arithmetic on the
encoded values wraps modulo 2^64, which numpy's int64 array arithmetic does natively.
CrypTen's ``FixedPointEncoder`` uses the same base (2) and precision (16 bits) and the same
``torch.long`` storage, so arrays encoded here (and additive shares of them) load
straight into a CrypTen ``ArithmeticSharedTensor``. (CrypTen truncates where this module
rounds to nearest; both are valid encodings at the same scale, rounding halves the error.)

Large vectors are converted in cache-sized chunks through one float64 buffer, so encoding
an 11M-parameter update makes no model-sized float64 temporaries.
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
#: Elements per conversion chunk.
CHUNK = 1 << 16


def encode(x: np.ndarray | float, scale_by: int = 1) -> np.ndarray:
    """``round(x * scale_by * 2**16)`` as int64; raises :class:`ShareError` when out of range.

    ``scale_by`` is an exact integer multiplier applied before rounding (a hospital's
    sample count ``n_k`` in weighted FedAvg), so the product is encoded once. (Multiplying
    by ``scale_by * 2**16`` at once rounds exactly like multiplying by ``scale_by`` and
    then by the power of two.)
    """
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    flat = arr.reshape(-1)
    out = np.empty(flat.size, dtype=np.int64)
    factor = float(scale_by) * SCALE
    limit = MAX_ABS * SCALE
    buf = np.empty(min(CHUNK, flat.size), dtype=np.float64)
    for a in range(0, flat.size, CHUNK):
        b = min(a + CHUNK, flat.size)
        tmp = buf[:b - a]
        np.multiply(flat[a:b], factor, out=tmp)
        peak = float(np.max(np.abs(tmp)))
        if not peak < limit:  # also catches NaN (max propagates it) and infinity
            if not np.all(np.isfinite(tmp)):
                raise ShareError("not_finite", "cannot encode NaN or infinity")
            raise ShareError("out_of_range", f"|value| {peak / SCALE:.3g} >= {MAX_ABS:.3g} cannot be encoded")
        np.rint(tmp, out=tmp)
        out[a:b] = tmp
    return out.reshape(arr.shape)


def decode(v: np.ndarray, divisor: int | float = 1, dtype: type = np.float64) -> np.ndarray:
    """Back to floats: ``v / 2**16 / divisor`` (interpreting ring elements as signed).

    The division happens in float64 whatever ``dtype`` (the output type) is.
    """
    arr = np.asarray(v)
    if arr.dtype != np.int64:
        raise ShareError("wrong_dtype", f"expected int64 ring elements, got {arr.dtype}")
    flat = arr.reshape(-1)
    out = np.empty(flat.size, dtype=dtype)
    denom = SCALE * float(divisor)
    buf = np.empty(min(CHUNK, flat.size), dtype=np.float64)
    for a in range(0, flat.size, CHUNK):
        b = min(a + CHUNK, flat.size)
        tmp = buf[:b - a]
        tmp[...] = flat[a:b]
        np.divide(tmp, denom, out=tmp)
        out[a:b] = tmp
    return out.reshape(arr.shape)
