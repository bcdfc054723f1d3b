"""The in-process federation simulator: its aggregate (the cloud's secure sum and strategies)
equals plaintext FedAvg, and federated training improves the global model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_aggregator.accumulator import RoundAccumulator
from cloud_aggregator.strategies import PlainState, get_strategy
from edge_server.training.loop import evaluate, initial_state
from iomt.federation import FederationSpec, aggregate, run_federation
from protocols import sharing
from simulators.records import make_records

torch.set_num_threads(1)


def _plain_fedavg(states, weights):
    return {k: sum(w * s[k].astype(np.float64) for s, w in zip(states, weights)) / sum(weights) for k in states[0]}


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_aggregate_matches_plaintext_fedavg_within_fixed_point_error(monkeypatch, name):
    rng = np.random.default_rng(0)
    glob = {"w": rng.normal(size=(40, 7)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    states = [{k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in glob.items()} for _ in range(5)]
    weights = [10, 3, 25, 7, 1]
    summed: list[int] = []  # the sums go through the cloud parties' accumulator
    real_add = RoundAccumulator.add
    monkeypatch.setattr(RoundAccumulator, "add", lambda self, rnd, up: summed.append(rnd) or real_add(self, rnd, up))

    for parties in (2, 3, 5):
        secure = aggregate(get_strategy(name), states, weights, parties, PlainState())
        plain = _plain_fedavg(states, weights)
        for k in glob:
            assert np.abs(secure[k] - plain[k]).max() < 1e-4
    assert len(summed) == 5 * (2 + 3 + 5)


def test_fedadam_runs_the_strategy_step_after_the_secure_sum():
    rng = np.random.default_rng(1)
    rounds = [[{"w": rng.normal(size=30).astype(np.float32)} for _ in range(3)] for _ in range(3)]
    fedadam, ref = get_strategy("fedadam"), PlainState()
    server = PlainState()
    for states in rounds:
        got = aggregate(fedadam, states, [4, 5, 6], 3, server)
        want = fedadam.aggregate_plain(sum(n * s["w"].astype(np.float64) for n, s in zip([4, 5, 6], states)), 15, ref)
        assert np.abs(got["w"] - want).max() < 1e-3
    assert np.abs(got["w"] - _plain_fedavg(rounds[-1], [4, 5, 6])["w"]).mean() > 1e-3  # not FedAvg


def test_no_party_total_reveals_the_aggregate(monkeypatch):
    """Each party's running total on its own looks nothing like the real weighted sum."""
    seen: list[list[np.ndarray]] = []
    real_reconstruct = sharing.reconstruct

    def spy(shares):
        seen.append([np.array(s) for s in shares])
        return real_reconstruct(shares)

    monkeypatch.setattr(sharing, "reconstruct", spy)
    glob = {"w": np.zeros(1000, np.float32)}
    states = [{"w": np.full(1000, 0.5, np.float32)} for _ in range(3)]

    out = aggregate(get_strategy("fedavg"), states, [1, 1, 1], 3, PlainState())

    assert np.allclose(out["w"], 0.5, atol=1e-4)
    (totals,) = seen
    for total in totals:  # uniform ring elements: about half negative, huge magnitudes
        assert 0.3 < (total < 0).mean() < 0.7 and np.median(np.abs(total.astype(np.float64))) > 2**50


@pytest.mark.parametrize("name", ["fedsgd", "ours", "fedavgm"])
def test_spec_takes_only_the_clouds_strategy_names(name):
    with pytest.raises(ValueError, match="strategy"):
        FederationSpec(strategy=name)


@pytest.mark.parametrize("dp", [False, True])
def test_federated_rounds_beat_the_initial_model(dp):
    from protocols.model import ModelConfig
    cfg = ModelConfig(dim=8, cnn_channels=(2, 4, 8), ehr_hidden=8, lstm_hidden=8, lstm_layers=1,
                      text_len=16, text_layers=1, text_vocab=256)
    train = {f"h{i}": make_records(24, seed=i, hospital=f"h{i}", modalities=("ehr",), p_missing=0.0,
                                      strength=2.0) for i in range(3)}
    test = make_records(30, seed=99, hospital="t", modalities=("ehr",), p_missing=0.0, strength=2.0)
    spec = FederationSpec(strategy="fedavg", dp=dp, rounds=6, local_epochs=3, lr=1e-2, noise_multiplier=0.01, clip_norm=1.0)

    res = run_federation(cfg, train, spec, eval_records=test, eval_every=1)

    before = evaluate(cfg, initial_state(cfg, spec.seed), test)["accuracy"]
    last = res.history[-1]
    assert last["accuracy"] > max(0.6, before + 0.2)
    if dp:
        eps = [h["epsilon"] for h in res.history]
        assert eps == sorted(eps) and res.epsilon == eps[-1] > 0  # the accountant grows per round
    else:
        assert res.epsilon is None


def test_distributed_dp_puts_one_noise_draw_in_the_aggregate_for_the_same_epsilon():
    # Arrange: 4 equal hospitals whose training barely moves the model (lr 1e-9), so the
    # change of the global model is the aggregated DP noise
    from protocols.model import ModelConfig
    cfg = ModelConfig(dim=8, cnn_channels=(2, 4, 8), ehr_hidden=8, lstm_hidden=8, lstm_layers=1,
                      text_len=16, text_layers=1, text_vocab=256)
    train = {f"h{i}": make_records(8, seed=i, hospital=f"h{i}") for i in range(4)}
    init = initial_state(cfg, 0)

    def noise_std(mode):
        spec = FederationSpec(strategy="fedavg", dp=True, rounds=1, lr=1e-9, noise_multiplier=0.5, clip_norm=1.0, dp_mode=mode)
        res = run_federation(cfg, train, spec, init=init)
        change = np.concatenate([(res.state[k] - init[k]).ravel() for k in init])
        return float(change.std()), res.epsilon

    # Act
    local_std, local_eps = noise_std("local")
    dist_std, dist_eps = noise_std("distributed")

    # Assert: mean of 4 full draws has std sigma*C/2; of 4 quarter-variance draws sigma*C/4
    assert local_std == pytest.approx(0.5 / 2, rel=0.05)
    assert dist_std == pytest.approx(0.5 / 4, rel=0.05)
    assert dist_eps == pytest.approx(local_eps)  # equal weights: the same guarantee
    with pytest.raises(ValueError, match="dp_mode"):
        FederationSpec(dp_mode="central")
