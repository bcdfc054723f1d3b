"""The logistic-regression baselines: real learning on data where it is certain, the same
split as the experiments, missing modalities, and their rows in the result tables."""
from __future__ import annotations

import numpy as np
import pytest

from iomt.experiments import baselines, run_experiment
from iomt.experiments.breast_cancer import export
from iomt.experiments.data import byod_federation, split
from iomt.experiments.report import METRICS
from iomt.experiments.settings import Settings
from protocols.schema import PatientRecord


@pytest.fixture(scope="module")
def breast_cancer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bc")
    export(folder, n_hospitals=3, alpha=1.0, seed=0)
    return folder


def test_pooled_lr_on_breast_cancer_is_far_above_the_majority_class(breast_cancer):
    # Prepare: scikit-learn's breast cancer data as 3 hospitals, the experiments' split
    s = split(byod_federation(breast_cancer), seed=0)

    # Execute
    m = baselines.pooled(s, ("ehr",), num_classes=2)

    # Assert: the textbook result (about 95 %) on the pooled held-out patients, not a constant
    assert m["n"] == len(s.pooled("test")) >= 80
    assert m["accuracy"] >= 0.9 and m["accuracy"] >= m["majority_accuracy"] + 0.25, m
    assert m["roc_auc"] >= 0.95


def test_per_hospital_lr_scores_each_hospital_on_the_test_set_asked_for(breast_cancer):
    s = split(byod_federation(breast_cancer), seed=0)

    own = baselines.per_hospital(s, ("ehr",), 2, test="own")
    pooled = baselines.per_hospital(s, ("ehr",), 2, test="pooled")

    assert sorted(own) == sorted(pooled) == sorted(s.train)
    for h in s.train:
        assert own[h]["n"] == len(s.test[h]) and pooled[h]["n"] == len(s.pooled("test"))
        assert pooled[h]["accuracy"] >= 0.8  # even one hospital's patients teach an LR a lot


def test_table_rows_offer_only_the_features_the_data_has(breast_cancer):
    s = split(byod_federation(breast_cancer), seed=0)

    rows = baselines.rows(s, METRICS, 2)

    assert [(r["baseline"], r["features"]) for r in rows] == [("lr_pooled", "ehr"), ("lr_per_hospital", "ehr")]
    assert all(set(METRICS) <= set(r) and r["accuracy"] > 0.8 for r in rows)


def test_a_missing_modality_is_zero_with_an_absent_flag():
    rng = np.random.default_rng(0)
    # Prepare: two classes that differ in the first EHR feature; half the patients lack notes
    recs = [PatientRecord(f"p{i}", "h", label=i % 2, ehr=np.r_[2.0 * (i % 2) + rng.normal(0, 0.3), np.zeros(11)]
                          .astype(np.float32), note=("cough and fever" if i % 2 else "feels well") if i < 20 else None)
            for i in range(40)]

    model = baselines.Baseline(("ehr", "text"), num_classes=2).fit(recs[::2] + recs[1::4])
    probs = model.predict_proba(recs)

    assert probs.shape == (40, 2) and np.allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == np.arange(40) % 2).mean() >= 0.9   # notes or not


def test_table2_baseline_rows_on_a_byod_folder(breast_cancer, tmp_path):
    settings = Settings.quick_preset(tmp_path)
    settings = type(settings)(**{**settings.__dict__, "data": breast_cancer})

    payload = run_experiment("table2", settings, methods=("baselines",))

    rows = {r["method"]: r for r in payload["summary"]}
    assert list(rows) == ["lr_pooled:ehr", "lr_per_hospital:ehr"]
    assert rows["lr_pooled:ehr"]["accuracy_mean"] >= 0.9
