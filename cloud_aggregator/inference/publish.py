"""Write a secret-shared global model into parties' data directories, as aggregation does.

Secure aggregation (cloud_aggregator.party) publishes each party's share of
``S = sum_k n_k theta_k``; this module produces the same layout from plaintext weights for
benchmarks, demos and tests that need an encrypted model without running FL rounds first.
Each hospital's contribution is encoded and additively shared on its own, so no party's
share depends on anything but randomness and its own slice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cloud_aggregator.store import PartyStore
from protocols.fixedpoint import encode
from protocols.model_files import GlobalModelMeta
from protocols.sharing import expand_seed, share


def split_shares(x: np.ndarray, parties: int) -> list[np.ndarray]:
    """Full additive shares (int64, mod 2^64) of the int64 array ``x`` for ``parties`` parties."""
    full, seeds = share(x, parties)
    return [full.reshape(x.shape)] + [expand_seed(s, x.size).reshape(x.shape) for s in seeds]


def publish_shared_model(data_dirs: list[str | Path], states: list[dict[str, np.ndarray]], counts: list[int],
                         arch: str, config: dict, version: int = 1, round_: int = 0) -> dict:
    """Share ``sum_k counts[k] * states[k]`` among the parties in ``data_dirs``; returns the meta."""
    names = list(states[0])
    parties = len(data_dirs)
    acc = {name: [np.zeros(np.shape(states[0][name]), dtype=np.int64) for _ in range(parties)] for name in names}
    for state, n in zip(states, counts, strict=True):
        for name in names:
            for i, part in enumerate(split_shares(encode(state[name], scale_by=n), parties)):
                np.add(acc[name][i], part, out=acc[name][i])  # wraps mod 2^64
    meta = {"version": version, "round": round_, "parties": parties, "denominator": int(sum(counts)),
            "participants": [f"hospital-{k}" for k in range(len(states))],
            "spec": [[name, list(np.shape(states[0][name]))] for name in names],
            "model": {"arch": arch, "config": config}, "strategy": "fedavg"}
    for i, d in enumerate(data_dirs):
        PartyStore(d).write_global(version, {name: acc[name][i] for name in names},
                                   GlobalModelMeta(**meta, party_index=i))
    return meta
