"""Patient-level DP-SGD at the edge: per-patient gradients, clipping, accounting, the ledger,
and that a privately trained model exports and answers encrypted like any other."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from edge_server.training.privacy import (
    ACCOUNTANT_FILE, PrivacyAccountant, PrivacyBudgetExceeded, calibrate_noise, dpsgd_epsilon)
from edge_server.training import ModelConfig, TrainConfig, records_to_tensors, train_local
from edge_server.training.dpsgd import DpSgdUnsupported, make_private_trainable, per_example_grads, plan
from protocols.model import build_model, load_numpy_state, state_to_numpy
from simulators.records import make_records

torch.set_num_threads(1)

SMALL = ModelConfig(dim=8, ehr_hidden=8, lstm_hidden=8, cnn_channels=(2, 4, 4), text_vocab=64, text_len=12,
                    text_layers=1, text_heads=2, signal_pool=25, dropout=0.0)


def _sgd(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 8, "dp": "sgd", "noise_multiplier": 1.0, "clip_norm": 1.0,
                          "dp_seed": 0, **kw})


@pytest.fixture(scope="module", params=["bag", "transformer"])
def batch(request):
    """Inputs and labels of 6 patients, and the config, for each trainable text encoder."""
    cfg = SMALL.model_copy(update={"text_encoder": request.param})
    data = records_to_tensors(make_records(6, seed=3, p_missing=0.3), cfg)
    idx = torch.arange(len(data))
    if request.param == "transformer":
        tokens = data.tokens.clone()
        tokens[:, 6:] = 0  # padding the attention must mask
        data.tokens = tokens
    return data.inputs(idx, torch.zeros_like(idx)), data.labels, cfg


def test_per_patient_gradients_equal_a_loop_over_patients_for_every_module(batch):
    # Prepare: the model as DP-SGD trains it (Opacus DPLSTM in place of nn.LSTM)
    inputs, labels, cfg = batch
    torch.manual_seed(0)
    model = make_private_trainable(build_model(cfg)).eval()
    # Execute
    grads, losses = per_example_grads(model, inputs, labels)
    # Assert: each patient's gradient is the one a backward pass on that patient alone gives,
    # for every parameter (CNN, EHR MLP, LSTM, text encoder, LayerNorm, fusion, head)
    for i in range(len(labels)):
        model.zero_grad()
        logits, _ = model(*(t[i:i + 1] for t in inputs))
        loss = torch.nn.functional.cross_entropy(logits, labels[i:i + 1])
        loss.backward()
        assert float(losses[i]) == pytest.approx(float(loss), rel=1e-5)
        for name, p in model.named_parameters():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            assert torch.allclose(grads[name][i], expected, atol=1e-6), name


def test_the_dp_model_keeps_todays_parameter_names_and_values():
    torch.manual_seed(0)
    plain = build_model(SMALL)
    before = state_to_numpy(plain)
    private = make_private_trainable(plain)
    assert type(private.signal_encoder.lstm).__name__ == "DPLSTM"
    # DPLSTM's parameters carry nn.LSTM's names (its state dict adds aliases of them)
    params = {k: v.detach().numpy() for k, v in private.named_parameters()}
    assert set(params) == {k for k, _ in build_model(SMALL).named_parameters()}
    assert all(np.array_equal(params[k], before[k]) for k in params)
    # and a DP-SGD trained model loads back into today's architecture (nn.LSTM)
    result = train_local(SMALL, before, make_records(10, seed=1), _sgd(), progress=False)
    assert list(result.state) == list(before)
    load_numpy_state(build_model(SMALL), result.state)


def test_batchnorm_is_refused():
    with pytest.raises(DpSgdUnsupported, match="BatchNorm"):
        make_private_trainable(build_model(ModelConfig(image_encoder="resnet18")))


def test_one_patients_contribution_to_a_step_is_bounded_by_the_clip_norm(batch):
    # Prepare: one patient with an EHR made an outlier (huge EHR values), so that its raw
    # gradient is far above C
    inputs, labels, cfg = batch
    torch.manual_seed(0)
    model = make_private_trainable(build_model(cfg)).eval()
    inputs = list(inputs)
    outlier = int(torch.nonzero(inputs[4][:, 1] > 0)[0])
    inputs[1] = inputs[1].clone()
    inputs[1][outlier] = 1e3
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    # small: the head's LayerNorm bounds how far even an outlier's gradient grows (about 1 here)
    clip = 0.1

    def summed(rows: list[int]) -> torch.Tensor:
        rows_t = torch.tensor(rows)
        per, _ = per_example_grads(model, tuple(t[rows_t] for t in inputs), labels[rows_t])
        opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                          expected_batch_size=1, loss_reduction="sum")
        opt.zero_grad(set_to_none=True)
        for k, p in zip(names, params):
            p.grad_sample = per[k]
        assert opt.pre_step()
        return torch.cat([p.grad.reshape(-1) for p in params]).clone(), per

    # Execute: the step's gradient with and without the outlier
    with_0, per = summed(list(range(len(labels))))
    without_0, _ = summed([i for i in range(len(labels)) if i != outlier])
    raw0 = torch.sqrt(sum(per[k][outlier].pow(2).sum() for k in names))
    # Assert
    assert float(raw0) > 3 * clip
    assert float(torch.linalg.vector_norm(with_0 - without_0)) == pytest.approx(clip, rel=1e-4)


def test_the_accountant_agrees_with_opacus_rdp_and_calibration_meets_its_target():
    # Abadi et al.'s MNIST setting: q = 0.01, sigma = 1.1, 10,000 steps, delta = 1e-5
    ours = dpsgd_epsilon(1.1, 0.01, 10_000, 1e-5)
    independent = RDPAccountant()
    independent.history = [(1.1, 0.01, 10_000)]
    assert ours == pytest.approx(independent.get_epsilon(1e-5), rel=0.02)
    assert 5.0 < ours < 6.0
    sigma = calibrate_noise(1.0, 1e-5, 0.05, 2000)
    assert dpsgd_epsilon(sigma, 0.05, 2000, 1e-5) <= 1.0 < dpsgd_epsilon(sigma * 0.98, 0.05, 2000, 1e-5)


def test_a_run_planned_at_epsilon_8_spends_at_most_8_over_all_its_rounds():
    rounds = 5
    p = plan(40, 8, 2, 1.0, delta=1e-5, target_epsilon=8.0, planned_rounds=rounds)
    acc = PrivacyAccountant(delta=1e-5, epsilon_budget=8.0)
    for _ in range(rounds):
        acc.check_budget(p.noise_multiplier, p.sample_rate, p.steps, "dpsgd")
        acc.record_round(p.noise_multiplier, 1.0, p.sample_rate, p.steps, "dpsgd")
    assert 7.5 < acc.epsilon() <= 8.0
    assert acc.summary()["steps"] == rounds * p.steps == rounds * 2 * 5
    with pytest.raises(PrivacyBudgetExceeded):
        acc.check_budget(p.noise_multiplier, p.sample_rate, p.steps, "dpsgd")


def test_a_full_batch_dp_sgd_round_is_accounted_as_dp_sgd_not_as_an_update():
    # a hospital smaller than the batch: q = 1, one step per epoch; the sensitivity is still C
    p = plan(10, 32, 1, 1.0, delta=1e-5, target_epsilon=8.0, planned_rounds=2)
    assert (p.sample_rate, p.steps) == (1.0, 1)
    acc = PrivacyAccountant(delta=1e-5)
    acc.record_round(p.noise_multiplier, 1.0, p.sample_rate, p.steps, "dpsgd")
    assert acc.epsilon() == pytest.approx(dpsgd_epsilon(p.noise_multiplier, 1.0, 1, 1e-5))


def test_a_round_over_the_budget_is_refused_before_training(tmp_path):
    acc = PrivacyAccountant.for_data_dir(tmp_path, delta=1e-5, epsilon_budget=0.01)
    with pytest.raises(PrivacyBudgetExceeded, match="over the budget of 0.01"):
        train_local(SMALL, None, make_records(10, seed=1), _sgd(), progress=False, accountant=acc)
    assert acc.rounds == [] and not (tmp_path / ACCOUNTANT_FILE).exists()


def test_the_ledger_survives_a_restart_and_a_rerun_composes_with_it(tmp_path):
    records = make_records(10, seed=1)
    first = train_local(SMALL, None, records, _sgd(), progress=False,
                        accountant=PrivacyAccountant.for_data_dir(tmp_path, delta=1e-5))
    # a restart: a fresh accountant reads the same ledger
    reopened = PrivacyAccountant.for_data_dir(tmp_path, delta=1e-5)
    assert reopened.epsilon() == pytest.approx(first.metrics["epsilon"])
    assert first.metrics["privacy_unit"] == "patient" and first.metrics["delta"] == 1e-5
    # a re-run on the same data directory adds to what was spent
    second = train_local(SMALL, None, records, _sgd(), progress=False, accountant=reopened)
    assert second.metrics["epsilon"] > first.metrics["epsilon"]
    saved = json.loads((tmp_path / ACCOUNTANT_FILE).read_text())
    assert [r["mechanism"] for r in saved["rounds"]] == ["dpsgd", "dpsgd"]
    assert saved["epsilon"] == pytest.approx(second.metrics["epsilon"])
    steps = saved["rounds"][0]["steps"]
    assert second.metrics["epsilon"] == pytest.approx(
        dpsgd_epsilon(1.0, saved["rounds"][0]["sample_rate"], 2 * steps, 1e-5))


def test_noise_is_fresh_without_a_seed_and_reproducible_with_one():
    records = make_records(10, seed=1)
    a, b = (train_local(SMALL, None, records, _sgd(dp_seed=None), progress=False) for _ in range(2))
    c, d = (train_local(SMALL, None, records, _sgd(dp_seed=5), progress=False) for _ in range(2))
    assert any(not np.array_equal(a.state[k], b.state[k]) for k in a.state)
    assert all(np.array_equal(c.state[k], d.state[k]) for k in c.state)


def test_dp_sgd_needs_noise_or_a_finite_target():
    with pytest.raises(ValueError, match="target_epsilon"):
        TrainConfig(dp="sgd")
    with pytest.raises(ValueError, match="finite"):
        calibrate_noise(float("inf"), 1e-5, 0.1, 100)


@pytest.mark.integration
def test_edge_train_is_private_by_default_and_a_rerun_past_the_budget_exits_3(tmp_path):
    from iomt.supervisor import run_iomt
    from tests.utils.records import write_store
    write_store(tmp_path, 20, seed=0)
    # Execute: the default run (DP-SGD, epsilon 8 for the run), then the same run again
    first = json.loads(run_iomt("edge", "train", "--data-dir", str(tmp_path), "--epochs", "2", "--json",
                                "--no-progress").stdout)
    model = tmp_path / "models" / "local.onnx"
    stamp = model.stat().st_mtime_ns
    again = run_iomt("edge", "train", "--data-dir", str(tmp_path), "--epochs", "2", "--no-progress", check=False)
    # Assert: epsilon <= 8 at delta 1e-5, patient level; the re-run would pass 8 in all and is refused
    assert first["dp"]["mode"] == "sgd" and first["dp"]["unit"] == "patient"
    assert 7.0 < first["dp"]["epsilon"] <= 8.0 and first["dp"]["delta"] == 1e-5
    assert again.returncode == 3
    assert "over the budget of 8" in again.stderr and "refusing to start round 2" in again.stderr
    assert model.stat().st_mtime_ns == stamp
    ledger = json.loads((tmp_path / ACCOUNTANT_FILE).read_text())
    assert len(ledger["rounds"]) == 1 and ledger["epsilon"] == pytest.approx(first["dp"]["epsilon"])


def test_a_dp_sgd_model_exports_to_onnx_and_answers_encrypted_like_any_other(tmp_path):
    import onnxruntime as ort

    from cloud_aggregator.crypten_compat import load_crypten
    from cloud_aggregator.inference.client import prepare_inputs, unscale_outputs
    from cloud_aggregator.inference.publish import publish_shared_model, split_shares
    from edge_server.inference.onnx_export import export_onnx
    from protocols.fixedpoint import decode, encode
    from protocols.model import INPUT_NAMES
    from protocols.sharing import reconstruct
    from tests.cloud_aggregator.test_quadratic_head import _party

    # Prepare: a quadratic-fusion model trained with DP-SGD
    cfg = SMALL.model_copy(update={"fusion": "quadratic"})
    state = train_local(cfg, None, make_records(12, seed=4), _sgd(epochs=2), progress=False).state
    model = load_numpy_state(build_model(cfg), state).eval()
    records = records_to_tensors(make_records(5, seed=9), cfg)
    idx = torch.arange(len(records))
    inputs = records.inputs(idx, torch.zeros_like(idx))
    # Execute 1: ONNX Runtime on its export
    path = export_onnx(cfg, state, tmp_path / "dp.onnx")
    session = ort.InferenceSession(str(path))
    onnx_logits = session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})[0]
    # Execute 2: its fusion and head on secret shares, two CrypTen parties
    dirs = [tmp_path / f"p{i}" for i in range(2)]
    publish_shared_model(dirs, [state], [12], "multimodal", json.loads(cfg.to_json()))
    with torch.no_grad():
        feats = model.encode(*inputs[:4])
        ref_logits, _ = model(*inputs)
    query = prepare_inputs({"features": feats.numpy().astype(np.float64),
                            "mask": inputs[4].numpy().astype(np.float64)})
    shares = [{}, {}]
    for name, value in query.items():
        for i, part in enumerate(split_shares(encode(value), 2)):
            shares[i][name] = part
    results = load_crypten().mpc.run_multiprocess(world_size=2)(_party)([str(d) for d in dirs], shares, 1)
    raw = {k: decode(reconstruct([r[0][0][k] for r in results])) for k in results[0][0][0]}
    got = unscale_outputs(raw)
    # Assert: the same answers as the plaintext model
    assert np.abs(onnx_logits - ref_logits.numpy()).max() < 1e-4
    assert np.abs(got["logits"] - ref_logits.numpy()).max() < 1e-2
    assert (got["logits"].argmax(1) == ref_logits.numpy().argmax(1)).all()
