"""The arithmetic of distributed noise that hospitals and coordinator share: how much noise a
weighted secure aggregate carries for each hospital in it, and the ε of rounds of it.

Each of the K hospitals a round announces clips its whole update to ``C`` and adds
``N(0, σ²C²/K)``; FedAvg's secure sum is ``Σ n_k (Δ_k + z_k)`` over the participants.
Neighbouring rounds differ in one hospital's whole update (replaced by zero; that it took part
and its sample count stay visible, as the round status shows them), so hospital k's
sensitivity is ``n_k C`` against a noise std of ``σ C √(Σ n_j² / K)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def distributed_noise_multiplier(noise_multiplier: float, weights: Sequence[float],
                                 hospitals: int | None = None) -> float:
    """The noise multiplier a weighted secure aggregate guarantees to every hospital in it.

    ``weights`` are the participants' sample counts, ``hospitals`` is K (default: as many as
    there are weights). Hospital k gets ``σ · √(Σ w² / K) / w_k``; the one with the largest
    weight gets the least, which is returned. Equal weights and K participants give exactly σ;
    more participants than K add noise; unequal weights take it from the largest hospital.
    """
    if not weights or min(weights) <= 0:
        raise ValueError(f"weights must be positive, got {list(weights)}")
    k = len(weights) if hospitals is None else hospitals
    if k < 1:
        raise ValueError(f"hospitals must be >= 1, got {k}")
    return float(noise_multiplier * math.sqrt(sum(w * w for w in weights) / k) / max(weights))


def gaussian_epsilon(noise_multipliers: Sequence[float], delta: float) -> float:
    """ε at ``delta`` of a composition of Gaussian mechanisms with these noise multipliers
    (sensitivity 1 each; RDP accountant of Google's dp-accounting, as the edge's ledger)."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(list(range(2, 64)) + [80, 96, 128, 192, 256, 512, 1024])
    for sigma in noise_multipliers:
        acc.compose(dp_event.GaussianDpEvent(sigma))
    return float(acc.get_epsilon(delta))
