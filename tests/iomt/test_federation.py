"""The in-process federation simulator: secure aggregation equals plaintext FedAvg, and
federated training improves the global model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_server.training.loop import evaluate
from iomt.federation import FederationSpec, initial_state, plain_fedavg, run_federation, secure_fedavg
from protocols import sharing
from simulators.records import make_records

torch.set_num_threads(1)


def test_secure_fedavg_matches_plaintext_within_fixed_point_error():
    rng = np.random.default_rng(0)
    glob = {"w": rng.normal(size=(40, 7)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    states = [{k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in glob.items()} for _ in range(5)]
    weights = [10, 3, 25, 7, 1]

    for parties in (2, 3, 5):
        secure = secure_fedavg(glob, states, weights, parties)
        plain = plain_fedavg(states, weights)
        for k in glob:
            assert np.abs(secure[k] - plain[k]).max() < 1e-4


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

    out = secure_fedavg(glob, states, [1, 1, 1], parties=3)

    assert np.allclose(out["w"], 0.5, atol=1e-4)
    (totals,) = seen
    for total in totals:  # uniform ring elements: about half negative, huge magnitudes
        assert 0.3 < (total < 0).mean() < 0.7 and np.median(np.abs(total.astype(np.float64))) > 2**50


def test_spec_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        FederationSpec(strategy="fedsgd")


@pytest.mark.parametrize("strategy", ["fedavg", "ours"])
def test_federated_rounds_beat_the_initial_model(strategy):
    from protocols.model import ModelConfig
    cfg = ModelConfig(dim=8, cnn_channels=(2, 4, 8), ehr_hidden=8, lstm_hidden=8, lstm_layers=1,
                      text_len=16, text_layers=1, text_vocab=256)
    train = {f"h{i}": make_records(24, seed=i, hospital=f"h{i}", modalities=("ehr",), p_missing=0.0,
                                      strength=2.0) for i in range(3)}
    test = make_records(30, seed=99, hospital="t", modalities=("ehr",), p_missing=0.0, strength=2.0)
    spec = FederationSpec(strategy=strategy, rounds=6, local_epochs=3, lr=1e-2, noise_multiplier=0.01, clip_norm=1.0)

    res = run_federation(cfg, train, spec, eval_records=test, eval_every=1)

    before = evaluate(cfg, initial_state(cfg, spec.seed), test)["accuracy"]
    last = res.history[-1]
    assert last["accuracy"] > max(0.6, before + 0.2)
    if strategy == "ours":
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
        spec = FederationSpec(strategy="ours", rounds=1, lr=1e-9, noise_multiplier=0.5, clip_norm=1.0, dp_mode=mode)
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
