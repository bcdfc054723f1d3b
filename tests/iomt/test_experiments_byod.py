"""The breast-cancer BYOD export round-trips, and experiments run on a BYOD folder."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from edge_server.dataset.byod import load_federation_folder
from iomt.experiments import run_experiment
from iomt.experiments.breast_cancer import column_name, dirichlet_split, export
from iomt.experiments.settings import Settings
from protocols.schema import EHR_DIM

torch.set_num_threads(1)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_breast_cancer_export_round_trips(tmp_path, fmt):
    from sklearn.datasets import load_breast_cancer
    data = load_breast_cancer()

    counts = export(tmp_path, n_hospitals=5, alpha=0.5, seed=3, fmt=fmt)
    schema, hospitals = load_federation_folder(tmp_path)

    assert sum(counts.values()) == len(data.target) == sum(len(r) for r in hospitals.values())
    assert schema.classes == tuple(data.target_names) and schema.ehr_dim == EHR_DIM + 30
    first = column_name(data.feature_names[0])
    mean, std = schema.ehr_extra[first]
    for recs in hospitals.values():
        for rec in recs:
            i = int(rec.patient_id[2:])
            assert rec.label == data.target[i]
            assert np.isnan(rec.ehr[:EHR_DIM]).all()  # the schema's own features are absent
            assert rec.ehr[EHR_DIM] == pytest.approx((data.data[i, 0] - mean) / std, rel=1e-5)
            assert rec.modalities() == ("ehr",)


def test_dirichlet_split_is_non_iid_and_complete():
    labels = np.array([0] * 200 + [1] * 300)

    parts = dirichlet_split(labels, 10, alpha=0.3, seed=1)

    assert sorted(np.concatenate(parts).tolist()) == list(range(500))
    fractions = [labels[p].mean() for p in parts]
    assert min(len(p) for p in parts) >= 15
    assert max(fractions) - min(fractions) > 0.3  # label mixes differ a lot between hospitals


def test_experiments_run_on_byod_folder(tmp_path):
    export(tmp_path / "data", n_hospitals=3, alpha=1.0, seed=0)
    settings = Settings.quick_preset(tmp_path / "out")
    settings = type(settings)(**{**settings.__dict__, "data": tmp_path / "data", "rounds": 4,
                                                 "local_epochs": 2, "lr": 1e-2})

    payload = run_experiment("local_vs_global", settings)

    rows = list(csv.DictReader((tmp_path / "out" / "local_vs_global.csv").open()))
    assert [r["hospital"] for r in rows] == ["hospital-00", "hospital-01", "hospital-02"]
    assert (tmp_path / "out" / "local_vs_global.png").stat().st_size > 1000
    assert payload["settings"]["data"] == str(tmp_path / "data")
    # Tabular breast-cancer data is easy: a few rounds of a tiny model clearly beat chance.
    assert payload["overall"]["global_fedavg_accuracy"] > 0.6
    # ... and a logistic regression on the same patients learns it (about 95 %), locally too
    assert payload["lr_features"] == "ehr"
    assert payload["overall"]["pooled_lr_accuracy"] >= 0.9 and payload["overall"]["local_lr_accuracy"] >= 0.8
