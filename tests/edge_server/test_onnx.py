"""ONNX export and ONNX Runtime inference against PyTorch, and the train/predict CLIs."""
from __future__ import annotations

import itertools
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_server.inference.onnx_export import export_onnx, read_metadata
from edge_server.inference.onnx_predict import OnnxPredictor
from edge_server.training import ModelConfig, TrainConfig, predict_proba, records_to_tensors, train_local
from protocols.model import INPUT_NAMES, build_model, load_numpy_state
from protocols.schema import CONDITIONS, MODALITIES
from iomt.supervisor import run_iomt
from simulators.records import make_records
from tests.utils.records import write_store

torch.set_num_threads(1)

SUBSETS = [s for r in range(1, 5) for s in itertools.combinations(MODALITIES, r)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained model and its ONNX export."""
    cfg = ModelConfig()
    result = train_local(cfg, None, make_records(24, seed=0), TrainConfig(epochs=2), progress=False)
    path = export_onnx(cfg, result.state, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return cfg, result.state, path


def test_onnx_matches_pytorch_for_every_modality_subset(trained):
    # Prepare: one patient per non-empty modality subset (15), two signal windows each.
    cfg, state, path = trained
    rng = np.random.default_rng(1)
    from simulators.records import make_record
    records = [make_record(rng, i % 3, i, modalities=subset) for i, subset in enumerate(SUBSETS)]
    data = records_to_tensors(records, cfg)
    model = load_numpy_state(build_model(cfg), state).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Execute: the same inputs through both runtimes, window 0
    idx = torch.arange(len(records))
    inputs = data.inputs(idx, torch.zeros_like(idx))
    with torch.no_grad():
        logits, weights = model(*inputs)
    onnx_logits, onnx_weights = session.run(None, dict(zip(INPUT_NAMES, (t.numpy() for t in inputs))))
    # Assert
    np.testing.assert_allclose(onnx_logits, logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(onnx_weights, weights.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(onnx_weights.sum(1), 1.0, atol=1e-6)
    for row, subset in enumerate(SUBSETS):
        absent = [i for i, m in enumerate(MODALITIES) if m not in subset]
        assert (onnx_weights[row, absent] == 0).all()
    # batch size is dynamic: one patient alone gives the same answer
    single = session.run(None, {n: t[:1].numpy() for n, t in zip(INPUT_NAMES, inputs)})
    np.testing.assert_allclose(single[0], onnx_logits[:1], rtol=1e-4, atol=1e-5)


def test_quadratic_fusion_exports_and_matches_pytorch(tmp_path):
    """The MPC-friendly fusion runs at the edge through ONNX Runtime like the paper's."""
    from simulators.records import make_record
    torch.manual_seed(0)
    cfg = ModelConfig(fusion="quadratic")
    model = build_model(cfg).eval()
    path = export_onnx(cfg, {k: v.detach().numpy() for k, v in model.state_dict().items()
                             if v.is_floating_point()}, tmp_path / "model.onnx")
    rng = np.random.default_rng(2)
    data = records_to_tensors([make_record(rng, i % 3, i, modalities=m) for i, m in enumerate(SUBSETS)], cfg)
    idx = torch.arange(len(SUBSETS))
    inputs = data.inputs(idx, torch.zeros_like(idx))
    with torch.no_grad():
        logits, weights = model(*inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_weights = session.run(None, dict(zip(INPUT_NAMES, (t.numpy() for t in inputs))))
    np.testing.assert_allclose(onnx_logits, logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(onnx_weights, weights.numpy(), rtol=1e-4, atol=1e-6)
    assert (onnx_weights[inputs[-1].numpy() == 0] == 0).all()


def test_predictor_on_records_matches_pytorch_window_averaged(trained):
    cfg, state, path = trained
    records = make_records(7, seed=9)
    predictor = OnnxPredictor(path)
    ids, probs, weights = predictor.predict(records)
    torch_probs, torch_weights = predict_proba(load_numpy_state(build_model(cfg), state),
                                               records_to_tensors(records, cfg, need_label=False))
    assert ids == [r.patient_id for r in records]
    np.testing.assert_allclose(probs, torch_probs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weights, torch_weights, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert read_metadata(path) == (cfg, list(CONDITIONS))


@pytest.mark.integration
def test_train_then_predict_cli_on_a_real_edge_store(tmp_path):
    # Prepare: an edge store with 30 patients' EHR bundles and notes
    ids = write_store(tmp_path, 30, seed=0)
    # Execute: train with the paper's update-level DP, as JSON
    proc = run_iomt("edge", "train", "--data-dir", str(tmp_path), "--epochs", "3", "--json", "--no-progress",
                    "--dp", "update", "--clip-norm", "5", "--noise-multiplier", "1.0")
    out = json.loads(proc.stdout)
    # Assert
    assert out["patients"] == {"train": 21, "val": 4, "test": 5}
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert 0.0 <= out["test"][key] <= 1.0
    assert out["dp"]["epsilon"] > 0
    assert (tmp_path / "models" / "local.onnx").exists()
    assert json.loads((tmp_path / "privacy_accountant.json").read_text())["rounds"][0]["noise_multiplier"] == 1.0
    pred = json.loads(run_iomt("edge", "predict", "--data-dir", str(tmp_path), "--patient", ids[4], "--json").stdout)
    assert set(pred["probabilities"]) == set(CONDITIONS)
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(pred["modality_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert pred["modality_weights"]["image"] == 0 and pred["modality_weights"]["signals"] == 0
    assert pred["modalities_present"] == ["ehr", "text"]


@pytest.mark.integration
def test_cli_errors_are_clear(tmp_path):
    write_store(tmp_path, 3, seed=0)
    proc = run_iomt("edge", "predict", "--data-dir", str(tmp_path), "--patient", "nobody", check=False)
    assert proc.returncode == 2 and "no model" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_iomt("edge", "train", "--data-dir", str(empty), "--no-progress", check=False)
    assert proc.returncode == 2 and "labelled patients" in proc.stderr
