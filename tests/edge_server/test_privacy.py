"""DP on the update (clip + Gaussian noise, paper eq. 3) and the RDP privacy accountant."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_server.training.privacy import (
    ACCOUNTANT_FILE, PrivacyAccountant, PrivacyBudgetExceeded, add_distributed_noise, flatten, privatize_update)
from protocols.dp_noise import distributed_noise_multiplier, gaussian_epsilon
from edge_server.training import ModelConfig, TrainConfig, TrainingError, initial_state, train_local
from protocols.errors import IomtError
from simulators.records import make_records

torch.set_num_threads(1)


def _update(scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": scale * torch.randn(10, 20, generator=g), "b.bias": scale * torch.randn(30, generator=g)}


def test_clipping_bounds_the_update_norm_and_leaves_small_updates_alone():
    big, small = _update(10.0), _update(0.001)
    clipped, info = privatize_update(big, clip_norm=1.0, noise_multiplier=0.0)
    assert info.norm_before > 1.0 and info.clip_scale < 1.0
    assert float(torch.linalg.vector_norm(flatten(clipped))) == pytest.approx(1.0, rel=1e-5)
    # direction preserved
    torch.testing.assert_close(flatten(clipped) * info.norm_before, flatten(big), rtol=1e-4, atol=1e-4)
    same, info = privatize_update(small, clip_norm=1.0, noise_multiplier=0.0)
    assert info.clip_scale == 1.0
    torch.testing.assert_close(flatten(same), flatten(small))


def test_noise_has_std_sigma_times_c_and_is_reproducible_only_with_a_seed():
    zero = {"w": torch.zeros(200_000)}
    noisy, info = privatize_update(zero, clip_norm=0.5, noise_multiplier=2.0,
                                   generator=torch.Generator().manual_seed(3))
    assert info.noise_std == pytest.approx(1.0)
    assert float(noisy["w"].std()) == pytest.approx(1.0, rel=0.01)
    assert abs(float(noisy["w"].mean())) < 0.01
    again, _ = privatize_update(zero, 0.5, 2.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again["w"], noisy["w"])
    fresh_a, _ = privatize_update(zero, 0.5, 2.0)
    fresh_b, _ = privatize_update(zero, 0.5, 2.0)
    assert not torch.equal(fresh_a["w"], fresh_b["w"])  # OS entropy without a seed


def test_bad_dp_parameters_are_refused():
    with pytest.raises(ValueError):
        privatize_update(_update(1.0), clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError):
        privatize_update(_update(1.0), clip_norm=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError):
        privatize_update(_update(1.0), clip_norm=1.0, noise_multiplier=1.0, noise_fraction=0.0)


def test_distributed_shares_of_k_hospitals_sum_to_one_full_noise_draw():
    # Arrange: 4 hospitals, each adding 1/4 of the variance to a zero update
    k, zero = 4, {"w": torch.zeros(200_000)}
    shares = [privatize_update(zero, clip_norm=0.5, noise_multiplier=2.0, noise_fraction=1 / k,
                               generator=torch.Generator().manual_seed(i))[0]["w"] for i in range(k)]

    # Assert: each share is half as noisy; their sum is as noisy as one local-DP update (std sigma*C = 1)
    assert float(shares[0].std()) == pytest.approx(0.5, rel=0.01)
    assert float(sum(shares).std()) == pytest.approx(1.0, rel=0.01)


def test_distributed_guarantee_is_sigma_for_equal_weights_and_less_for_the_largest_hospital():
    assert distributed_noise_multiplier(1.5, [20, 20, 20]) == pytest.approx(1.5)
    # weights 10, 10, 40: rms = sqrt(600), so the 40-sample hospital gets 1.5 * sqrt(600) / 40
    assert distributed_noise_multiplier(1.5, [10, 10, 40]) == pytest.approx(1.5 * 600 ** 0.5 / 40)
    with pytest.raises(ValueError):
        distributed_noise_multiplier(1.0, [3, 0])
    # K = 2 announced, 3 equal participants: 3/2 of the variance, sigma * sqrt(3/2)
    assert distributed_noise_multiplier(1.5, [20, 20, 20], hospitals=2) == pytest.approx(1.5 * 1.5 ** 0.5)


def test_a_hospitals_share_clips_the_whole_update_and_adds_one_kth_of_the_variance():
    base = {"w": np.zeros(100_000, np.float32), "b": np.ones(3, np.float32)}
    trained = {"w": np.full(100_000, 0.01, np.float32), "b": np.ones(3, np.float32)}  # update norm 3.16
    state, res = add_distributed_noise(trained, base, clip_norm=0.5, noise_multiplier=2.0, hospitals=4,
                                       generator=torch.Generator().manual_seed(0))
    assert res.norm_before == pytest.approx(10 ** 0.5, rel=1e-3)
    assert res.clip_scale == pytest.approx(0.5 / 10 ** 0.5, rel=1e-3)
    assert res.noise_std == pytest.approx(2.0 * 0.5 / 2)  # sigma * C / sqrt(K)
    noise = state["w"] - base["w"] - 0.01 * res.clip_scale
    assert float(noise.std()) == pytest.approx(0.5, rel=0.02) and abs(float(noise.mean())) < 0.01
    assert set(state) == set(trained) and state["w"].dtype == np.float32


def test_gaussian_epsilon_composes_rounds_and_agrees_with_the_edge_ledger():
    ledger = PrivacyAccountant(delta=1e-5, unit="hospital")
    for sigma in (2.0, 3.0):
        ledger.record_round(sigma)
    assert gaussian_epsilon([2.0, 3.0], 1e-5) == pytest.approx(ledger.epsilon(), rel=1e-9)
    assert gaussian_epsilon([], 1e-5) == 0.0 and gaussian_epsilon([0.0], 1e-5) == float("inf")


def test_the_edge_accountant_counts_only_the_noise_the_hospital_added_itself():
    # A hospital cannot check that the others added their share: with a quarter of the
    # variance (sigma 2 -> own sigma 1) its ledger must read like a local-DP round at sigma 1.
    cfg, records = ModelConfig(), make_records(12, seed=4)
    shared, local = PrivacyAccountant(), PrivacyAccountant()
    tc = TrainConfig(epochs=1, clip_norm=1.0, noise_multiplier=2.0, noise_fraction=0.25, dp_seed=0)
    result = train_local(cfg, initial_state(cfg, seed=1), records, tc, progress=False, accountant=shared)
    local.record_round(1.0)
    assert result.metrics["noise_std"] == pytest.approx(1.0)
    assert shared.rounds[0]["noise_multiplier"] == pytest.approx(1.0)
    assert result.metrics["epsilon"] == pytest.approx(local.epsilon())


def test_local_training_with_dp_releases_an_update_within_the_clip_norm():
    cfg = ModelConfig()
    records = make_records(30, seed=2)
    glob = initial_state(cfg, seed=5)
    tc = TrainConfig(epochs=2, clip_norm=0.05, noise_multiplier=0.0)
    result = train_local(cfg, glob, records, tc, progress=False)
    delta = np.concatenate([(result.state[k] - glob[k]).ravel() for k in glob])
    assert result.metrics["update_norm"] > 0.05  # training moved further than C ...
    assert np.linalg.norm(delta) <= 0.05 * (1 + 1e-4)  # ... but the released update is clipped


def test_epsilon_grows_with_rounds_is_persisted_and_the_budget_stops_rounds(tmp_path):
    acc = PrivacyAccountant.for_data_dir(tmp_path, delta=1e-5, epsilon_budget=10.0)
    assert acc.epsilon() == 0.0
    eps = []
    with pytest.raises(PrivacyBudgetExceeded, match="budget"):
        for _ in range(100):
            acc.check_budget(2.0)
            eps.append(acc.record_round(2.0, clip_norm=1.0))
    assert len(eps) >= 2 and all(b > a for a, b in zip(eps, eps[1:]))
    assert eps[-1] <= 10.0 < acc.projected_epsilon(2.0)
    # persisted: a new accountant on the same dir continues from the same ledger
    again = PrivacyAccountant.for_data_dir(tmp_path, delta=1e-5, epsilon_budget=10.0)
    assert len(again.rounds) == len(eps) and again.epsilon() == pytest.approx(eps[-1])
    with pytest.raises(PrivacyBudgetExceeded):
        again.check_budget(2.0)
    saved = json.loads((tmp_path / ACCOUNTANT_FILE).read_text())
    assert saved["epsilon"] == pytest.approx(eps[-1])


def test_more_noise_and_the_hospital_unit_give_smaller_epsilon():
    def eps(sigma, unit):
        acc = PrivacyAccountant(unit=unit)
        for _ in range(5):
            acc.record_round(sigma)
        return acc.epsilon()

    assert eps(4.0, "patient") < eps(1.0, "patient")
    # hospital-level adjacency has half the sensitivity, so the same sigma costs less
    assert eps(2.0, "hospital") < eps(2.0, "patient")
    assert eps(2.0, "hospital") == pytest.approx(eps(4.0, "patient"))
    assert eps(0.0, "patient") == float("inf")


def test_a_corrupt_ledger_is_an_error_not_a_fresh_budget(tmp_path):
    (tmp_path / ACCOUNTANT_FILE).write_text("{not json")
    with pytest.raises(IomtError, match="unreadable"):
        PrivacyAccountant.for_data_dir(tmp_path)


def test_train_local_refuses_the_round_that_would_exceed_the_budget(tmp_path):
    cfg = ModelConfig()
    records = make_records(12, seed=4)
    tc = TrainConfig(epochs=1, clip_norm=1.0, noise_multiplier=1.0, dp_seed=0)
    budget = PrivacyAccountant(delta=1e-5).projected_epsilon(1.0) * 1.01  # room for one round only
    acc = PrivacyAccountant.for_data_dir(tmp_path, epsilon_budget=budget)
    first = train_local(cfg, None, records, tc, progress=False, accountant=acc)
    assert first.metrics["epsilon"] == pytest.approx(acc.epsilon()) and len(acc.rounds) == 1
    with pytest.raises(PrivacyBudgetExceeded):
        train_local(cfg, first.state, records, tc, progress=False, accountant=acc)
    assert len(PrivacyAccountant.for_data_dir(tmp_path).rounds) == 1  # the refused round was not recorded


def test_a_budget_without_noise_is_a_configuration_error():
    with pytest.raises(TrainingError, match="DP is off"):
        train_local(ModelConfig(), None, make_records(6), TrainConfig(epochs=1), progress=False,
                    accountant=PrivacyAccountant(epsilon_budget=1.0))
