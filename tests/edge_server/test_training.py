"""Local training: split by patient, learning beats the majority class, FedProx, determinism,
bad records, metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_server.training import (
    ModelConfig, TrainConfig, TrainingError, evaluate, initial_state, split_records, train_local)
from edge_server.training.metrics import classification_metrics
from protocols.schema import CONDITIONS
from simulators.records import make_records

torch.set_num_threads(1)


def _distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_split_is_70_15_15_by_patient_disjoint_stratified_and_seeded():
    records = make_records(60, seed=0)
    records.append(records[0])  # a second record of the same patient stays with the first
    train, val, test = split_records(records, seed=3)
    ids = [{r.patient_id for r in part} for part in (train, val, test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(len(i) for i in ids) == 60
    assert [len(i) for i in ids] == [42, 9, 9]
    assert {r.label for r in test} == set(range(len(CONDITIONS)))
    assert sum(r.patient_id == records[0].patient_id for r in train + val + test) == 2
    again = split_records(records, seed=3)
    assert [r.patient_id for r in again[2]] == [r.patient_id for r in test]
    assert [r.patient_id for r in split_records(records, seed=4)[2]] != [r.patient_id for r in test]


def test_training_beats_the_majority_class_on_held_out_patients():
    cfg = ModelConfig()
    train, val, test = split_records(make_records(150, seed=1, p_missing=0.3), seed=0)
    result = train_local(cfg, None, train, TrainConfig(epochs=10, seed=0), progress=False)
    metrics = evaluate(cfg, result.state, val + test)
    assert result.n_samples == len(train)
    assert metrics["n"] == len(val) + len(test)
    assert metrics["accuracy"] >= metrics["majority_accuracy"] + 0.3
    assert metrics["roc_auc"] > 0.85
    assert result.metrics["loss_history"][-1] < result.metrics["loss_history"][0]
    untrained = evaluate(cfg, initial_state(cfg, seed=0), val + test)
    assert metrics["accuracy"] > untrained["accuracy"]


def test_training_is_deterministic_under_a_seed():
    cfg = ModelConfig()
    records = make_records(20, seed=2)
    tc = TrainConfig(epochs=2, seed=7, clip_norm=1.0, noise_multiplier=0.5, dp_seed=11)
    a = train_local(cfg, None, records, tc, progress=False)
    b = train_local(cfg, None, records, tc, progress=False)
    for k in a.state:
        np.testing.assert_array_equal(a.state[k], b.state[k])
    c = train_local(cfg, None, records, tc.model_copy(update={"seed": 8}), progress=False)
    assert _distance(a.state, c.state) > 0


def test_fedprox_term_keeps_the_local_model_closer_to_the_global_one():
    cfg = ModelConfig()
    records = make_records(30, seed=3)
    glob = initial_state(cfg, seed=1)
    plain = train_local(cfg, glob, records, TrainConfig(epochs=3), progress=False)
    prox = train_local(cfg, glob, records, TrainConfig(epochs=3, prox_mu=10.0), progress=False)
    assert _distance(prox.state, glob) < 0.8 * _distance(plain.state, glob)


def test_training_starts_from_the_given_global_state():
    cfg = ModelConfig()
    records = make_records(9, seed=3)
    glob = initial_state(cfg, seed=1)
    near = train_local(cfg, glob, records, TrainConfig(epochs=1, lr=1e-5), progress=False)
    assert _distance(near.state, glob) < 0.05 * _distance(glob, initial_state(cfg, seed=2))


def test_bad_records_are_skipped_and_counted_and_valid_ones_still_train(caplog):
    cfg = ModelConfig()
    records = make_records(12, seed=5, p_missing=0.0)
    records[0].image = np.zeros((10, 10), np.float32)                   # wrong shape
    records[1].signal_windows = np.full((1, 200, 8), np.nan, np.float32)  # not finite
    records[2].label = None                                              # unlabelled
    records[3].label = 9                                                 # unknown class
    result = train_local(cfg, None, records, TrainConfig(epochs=1), progress=False)
    assert result.n_samples == 8
    assert result.metrics["n_skipped"] == {"bad_image": 1, "bad_signals": 1, "no_label": 1, "bad_label": 1}
    assert "skipping record of patient h0-p0000: bad_image" in caplog.text
    with pytest.raises(TrainingError, match="no usable"):
        train_local(cfg, None, records[:4], TrainConfig(epochs=1), progress=False)


def test_metrics_are_exact_on_known_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[labels] * 0.9 + 0.05
    m = classification_metrics(labels, perfect)
    assert m["accuracy"] == m["f1"] == m["precision"] == m["recall"] == m["roc_auc"] == 1.0
    assert m["majority_accuracy"] == pytest.approx(1 / 3) and m["n"] == 6
    wrong = np.eye(3)[(labels + 1) % 3]
    assert classification_metrics(labels, wrong)["accuracy"] == 0.0
    single = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1]]))
    assert single["roc_auc"] is None and single["accuracy"] == 1.0
    assert classification_metrics(np.zeros(0), np.zeros((0, 3)))["n"] == 0


def test_saved_model_round_trips(tmp_path):
    from edge_server.training import load_saved_model, save_model

    cfg = ModelConfig(dim=16)
    state = initial_state(cfg, seed=3)
    paths = save_model(tmp_path, cfg, state, name="global", info={"round": 4}, onnx=False)
    assert paths["state"].exists() and "onnx" not in paths
    cfg2, state2 = load_saved_model(tmp_path, "global")
    assert cfg2 == cfg and list(state2) == list(state)
    for k in state:
        np.testing.assert_array_equal(state2[k], state[k])


def test_training_on_the_simulated_cohort_beats_the_majority_class_on_held_out_patients():
    # Prepare: the simulator's patients, preprocessed exactly as the edge does (the label comes
    # from the FHIR Condition in the EHR bundle, so patients without EHR are unlabelled).
    from edge_server.dataset.preprocess import patient_record_from_raw
    from simulators.cohort import generate_cohort

    cohort = generate_cohort("h1", 120, seed=0, duration_s=10.0)
    records = [patient_record_from_raw(p.patient_id, p.hospital, p.streams or None, p.image, p.ehr, p.note)
               for p in cohort]
    records = [r for r in records if r.label is not None]
    train, val, test = split_records(records, seed=0)
    cfg = ModelConfig()
    # Execute
    result = train_local(cfg, None, train, TrainConfig(epochs=15, seed=0), progress=False)
    metrics = evaluate(cfg, result.state, val + test)
    # Assert: a clear margin over always answering the most frequent class
    assert metrics["n"] >= 30
    assert metrics["accuracy"] >= metrics["majority_accuracy"] + 0.15, metrics
    assert metrics["roc_auc"] >= 0.8, metrics
