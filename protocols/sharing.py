"""n-party additive secret sharing in Z_2^64 with seed-compressed shares.

To share ``x`` among ``n`` parties a hospital draws ``n-1`` fresh 32-byte seeds; party
``j > 0`` receives only its seed and expands it with AES-256 in counter mode (a CSPRNG, run by
OpenSSL through the maintained ``cryptography`` package) into its share ``r_j``; party 0 receives the one full share
``x - sum_j r_j  (mod 2^64)``. Any ``n-1`` shares are uniformly distributed and
independent of ``x``; the sum of all ``n`` is ``x``. So a hospital uploads one full share
plus ``n-1`` seeds, about 8 bytes per parameter whatever ``n`` is.
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


def new_seed() -> bytes:
    """A fresh 32-byte seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def expand_seed(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniformly random ring elements (int64) from a 32-byte seed (AES-256-CTR keystream)."""
    if len(seed) != SEED_BYTES:
        raise ShareError("bad_seed", f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_COUNTER0)).encryptor()
    # A read-only view over the keystream; callers only read it (or copy).
    return np.frombuffer(encryptor.update(bytes(8 * size)), dtype="<i8").view(np.int64)


def share(x: np.ndarray, parties: int) -> tuple[np.ndarray, list[bytes]]:
    """Split the int64 vector ``x`` into party 0's full share and seeds for parties 1..n-1."""
    if parties < 2:
        raise ValueError("secret sharing needs at least 2 parties")
    flat = np.ascontiguousarray(x, dtype=np.int64).reshape(-1)
    seeds = [new_seed() for _ in range(parties - 1)]
    full = flat.copy()
    for seed in seeds:
        np.subtract(full, expand_seed(seed, flat.size), out=full)  # wraps mod 2^64
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
