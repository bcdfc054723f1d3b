"""Strategies as objects: each one's round fields, its aggregate on a party's shares and the
plaintext equivalent (no processes; the MPC server step is tests/cloud_aggregator/test_server_opt.py)."""
from __future__ import annotations

import numpy as np
import pytest

from cloud_aggregator.accumulator import RoundAccumulator
from cloud_aggregator.strategies import (STRATEGIES, FedAdam, FedAvg, FedProx, FedYogi, PlainState,
                                         get_strategy)
from protocols import fixedpoint, sharing
from protocols.aggregation_messages import RoundConfig, ServerOptConfig, sharing_to_wire, upload_from_wire
from protocols.errors import ConfigError

COUNTS = [10, 3, 25]
HASH = "0" * 64


def _cfg(strategy: str, base_version: int | None = None) -> RoundConfig:
    return RoundConfig(round=2, version=2, base_version=base_version, deadline=0.0, strategy=strategy, parties=3,
                       spec=[("w", [50])], spec_hash=HASH)


def _party_totals(thetas: list[np.ndarray], parties: int) -> list[np.ndarray]:
    """Each party's share of S = sum_k n_k theta_k, summed by the parties' accumulator."""
    accs = [RoundAccumulator() for _ in range(parties)]
    for k, (theta, n) in enumerate(zip(thetas, COUNTS)):
        full, seeds = sharing.share(fixedpoint.encode(theta, scale_by=n), parties)
        bodies = sharing_to_wire(full, seeds, hospital=f"h{k}", round=2, n_samples=n, size=theta.size, spec_hash=HASH)
        for acc, body in zip(accs, bodies):
            acc.add(2, upload_from_wire(body))
    return [acc.total(2, thetas[0].size, [f"h{k}" for k in range(len(thetas))], lambda h: None) for acc in accs]


def _no_mpc(*_):
    raise AssertionError("FedAvg and FedProx need no server step")


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_through_shares_equal_the_weighted_mean(name):
    rng = np.random.default_rng(1)
    thetas = [rng.normal(size=50) for _ in COUNTS]
    strategy = get_strategy(name)

    results = [strategy.aggregate_shares(t, sum(COUNTS), _cfg(name, 1), _no_mpc) for t in _party_totals(thetas, 3)]

    assert {r.denominator for r in results} == {sum(COUNTS)}
    got = fixedpoint.decode(sharing.reconstruct([r.total for r in results]), divisor=results[0].denominator)
    want = sum(n * t for n, t in zip(COUNTS, thetas)) / sum(COUNTS)
    assert np.abs(got - want).max() < 1e-4
    plain = strategy.aggregate_plain(sum(n * t for n, t in zip(COUNTS, thetas)), sum(COUNTS), PlainState())
    assert np.allclose(plain, want)


def test_round_fields_say_what_clients_and_parties_run():
    opt = ServerOptConfig(lr=0.5)
    assert FedAvg().round_fields(prox_mu=0.1, server_opt=opt) == {"prox_mu": 0.0, "server_opt": None}
    assert FedProx().round_fields(prox_mu=0.1, server_opt=opt) == {"prox_mu": 0.1, "server_opt": None}
    assert FedAdam().round_fields(prox_mu=0.1, server_opt=opt) == {"prox_mu": 0.0, "server_opt": opt}


@pytest.mark.parametrize("name,opt", [("fedadam", "adam"), ("fedyogi", "yogi")])
def test_fedopt_warm_starts_then_runs_the_party_server_step(name, opt):
    strategy, calls = get_strategy(name), []

    def step(kind, cfg, total, denominator):
        calls.append((kind, cfg.base_version, denominator))
        return total * 0, {"opt": kind}

    first = strategy.aggregate_shares(np.ones(50, np.int64), 38, _cfg(name), step)
    later = strategy.aggregate_shares(np.ones(50, np.int64), 38, _cfg(name, 1), step)

    assert first.denominator == 38 and first.meta["server_opt"]["warm_start"] and not calls[:-1]
    assert calls == [(opt, 1, 38)] and later.denominator == 1 and later.meta == {"server_opt": {"opt": opt}}


def test_fedadam_and_fedyogi_plaintext_steps_match_a_hand_computation():
    o = ServerOptConfig(lr=0.1, beta1=0.5, beta2=0.75, tau=0.5)
    for strategy in (FedAdam(), FedYogi()):
        state = PlainState()
        assert strategy.aggregate_plain(np.array([2.0]), 2, state, o) == pytest.approx([1.0])  # warm start
        # d = 2 - 1 = 1; m = 0.5; v = 0.25; theta = 1 + 0.1 * 0.5 / sqrt(0.25 + 0.25)
        assert strategy.aggregate_plain(np.array([4.0]), 2, state, o) == pytest.approx([1 + 0.05 / 0.5 ** 0.5])
        assert (state.m, state.v) == (pytest.approx([0.5]), pytest.approx([0.25]))
    # a third step tells them apart: d = 1 - theta, d^2 < v
    adam, yogi = PlainState(np.array([1.0]), np.array([0.5]), np.array([0.25])), \
        PlainState(np.array([1.0]), np.array([0.5]), np.array([0.25]))
    FedAdam().aggregate_plain(np.array([1.5]), 1, adam, o)  # d = 0.5, d^2 = 0.25
    FedYogi().aggregate_plain(np.array([1.5]), 1, yogi, o)
    assert adam.v == pytest.approx([0.75 * 0.25 + 0.25 * 0.25])
    assert yogi.v == pytest.approx([0.25 - 0.25 * 0.25 * 1.0])  # sign(v - d^2) = sign(0) = +1
    assert adam.m == yogi.m == pytest.approx([0.5 * 0.5 + 0.5 * 0.5])


@pytest.mark.parametrize("name,why", [("fedsgd", "unknown strategy"), ("FedAvgM", "not implemented"),
                                      ("ours", "unknown strategy")])
def test_unknown_or_unimplemented_strategies_are_refused(name, why):
    with pytest.raises(ConfigError, match=why):
        get_strategy(name)


def test_names_are_case_insensitive_and_the_registry_is_the_cloud_names():
    assert sorted(STRATEGIES) == ["fedadam", "fedavg", "fedprox", "fedyogi"]
    assert isinstance(get_strategy("FedProx"), FedProx) and isinstance(get_strategy("fedprox"), FedAvg)
