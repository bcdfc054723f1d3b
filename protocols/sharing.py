"""n-party additive secret sharing in Z_2^64 with seed-compressed shares.

To share ``x`` among ``n`` parties a hospital draws ``n-1`` fresh 32-byte seeds; party
``j > 0`` receives only its seed and expands it with AES-256 in counter mode (a CSPRNG, run by
OpenSSL through the maintained ``cryptography`` package) into its share ``r_j``; party 0 receives the one full share
``x - sum_j r_j  (mod 2^64)``. Any ``n-1`` shares are uniformly distributed and
independent of ``x``; the sum of all ``n`` is ``x``. So a hospital uploads one full share
plus ``n-1`` seeds, about 8 bytes per parameter whatever ``n`` is.

Keystreams are produced in cache-sized chunks straight into a reused buffer
(``update_into``) and added into the destination in place, so expanding a seed into a
running sum allocates nothing proportional to the model (about 3x faster than expanding the
whole stream and adding it, bench/bench_secagg.py).
"""
from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocols.errors import ShareError

SEED_BYTES = 32
#: AES-CTR's initial counter block. Each seed keys exactly one stream (one flat vector),
#: so a fixed all-zero counter never repeats a (key, counter) pair. AES-CTR rather than
#: ChaCha20 because with AES-NI it expands about twice as fast here (bench/bench_secagg.py).
_COUNTER0 = bytes(16)
#: Ring elements per keystream chunk (512 KiB: stays in L2 between AES and the add).
CHUNK = 1 << 16
_ZEROS = bytes(8 * CHUNK)


def new_seed() -> bytes:
    """A fresh 32-byte seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def _keystream(seed: bytes, size: int):
    """Yield ``(start, stop, int64 view)`` chunks of the seed's keystream (the view is reused)."""
    if len(seed) != SEED_BYTES:
        raise ShareError("bad_seed", f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_COUNTER0)).encryptor()
    buf = bytearray(8 * CHUNK + 15)  # update_into wants block_size - 1 spare bytes
    zeros = memoryview(_ZEROS)
    for start in range(0, size, CHUNK):
        m = min(CHUNK, size - start)
        encryptor.update_into(zeros[:8 * m], buf)
        yield start, start + m, np.frombuffer(buf, dtype="<i8", count=m)


def expand_seed(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniformly random ring elements (int64) from a 32-byte seed (AES-256-CTR keystream)."""
    out = np.empty(size, dtype=np.int64)
    for a, b, chunk in _keystream(seed, size):
        out[a:b] = chunk
    return out


def add_seed_into(acc: np.ndarray, seed: bytes, subtract: bool = False) -> np.ndarray:
    """``acc += expand_seed(seed)`` (or ``-=``) in place, modulo 2^64, chunk by chunk."""
    if acc.dtype != np.int64 or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ValueError("the accumulator must be a contiguous 1-D int64 array")
    op = np.subtract if subtract else np.add
    for a, b, chunk in _keystream(seed, acc.size):
        view = acc[a:b]
        op(view, chunk, out=view)
    return acc


def share(x: np.ndarray, parties: int) -> tuple[np.ndarray, list[bytes]]:
    """Split the int64 vector ``x`` into party 0's full share and seeds for parties 1..n-1."""
    if parties < 2:
        raise ValueError("secret sharing needs at least 2 parties")
    flat = np.ascontiguousarray(x, dtype=np.int64).reshape(-1)
    seeds = [new_seed() for _ in range(parties - 1)]
    full = flat.copy()
    for seed in seeds:
        add_seed_into(full, seed, subtract=True)  # wraps mod 2^64
    return full, seeds


def reconstruct(shares: list[np.ndarray]) -> np.ndarray:
    """The secret: the sum of every party's share, modulo 2^64."""
    if not shares:
        raise ValueError("no shares to reconstruct from")
    total = np.array(shares[0], dtype=np.int64, copy=True)
    for s in shares[1:]:
        if np.shape(s) != total.shape:
            raise ShareError("wrong_shape", f"share shapes differ: {np.shape(s)} vs {total.shape}")
        np.add(total, s, out=total)
    return total
