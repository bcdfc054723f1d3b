"""RoundAccumulator: on-arrival sums equal the exact sum of the named participants' shares."""
from __future__ import annotations

import numpy as np

from cloud_aggregator.accumulator import RoundAccumulator
from protocols import sharing
from protocols.aggregation_messages import sharing_to_wire, upload_from_wire

SIZE = 1000 + sharing.CHUNK  # more than one keystream chunk


def _uploads(names, party, rng):
    out, secrets = {}, {}
    for name in names:
        x = rng.integers(-2**40, 2**40, SIZE)
        full, seeds = sharing.share(x, 2)
        bodies = sharing_to_wire(full, seeds, hospital=name, round=3, n_samples=1, size=SIZE, spec_hash="0" * 64)
        out[name], secrets[name] = upload_from_wire(bodies[party]), x
    return out, secrets


def test_on_arrival_sum_fixes_up_extras_and_missing():
    rng = np.random.default_rng(1)
    names = ["a", "b", "c", "d"]
    ups, _ = _uploads(names, 0, rng)
    acc = RoundAccumulator()
    for name in ("a", "b", "c"):  # "d" is only added by the round-close fix-up
        acc.add(3, ups[name])
    acc.add(3, ups["a"])  # a duplicate add is ignored
    loaded = []

    def load(name):
        loaded.append(name)
        return ups[name]
    total = acc.total(3, SIZE, ["a", "c", "d"], load)  # "b" is not a participant
    assert np.array_equal(total, ups["a"].share() + ups["c"].share() + ups["d"].share())
    assert sorted(loaded) == ["b", "d"]
    assert acc.held(3) == set()  # forgotten after close


def test_seed_shares_accumulate_like_expanded_ones():
    rng = np.random.default_rng(2)
    ups, _ = _uploads(["a", "b"], 1, rng)
    acc = RoundAccumulator()
    for u in ups.values():
        acc.add(3, u)
    total = acc.total(3, SIZE, ["a", "b"], lambda n: ups[n])
    assert np.array_equal(total, ups["a"].share() + ups["b"].share())


def test_full_and_seed_sums_reconstruct_the_secret_sum():
    x = np.random.default_rng(3).integers(-2**40, 2**40, SIZE)
    full, seeds = sharing.share(x, 3)
    acc = full.copy()
    for s in seeds:
        sharing.add_seed_into(acc, s)
    assert np.array_equal(acc, x)
    sharing.add_seed_into(acc, seeds[0], subtract=True)
    assert np.array_equal(acc, x - sharing.expand_seed(seeds[0], SIZE))
