"""Every simulated modality carries evidence of the condition that survives the edge's
preprocessing: a classifier on that modality alone is clearly above chance on held-out
patients, and all four together do at least as well as the best one alone."""
from __future__ import annotations

import numpy as np
import pytest

from iomt.experiments import baselines
from iomt.experiments.data import restrict_split, simulated_federation, split
from protocols.schema import CONDITIONS

FOLDS = 3


@pytest.fixture(scope="module")
def federation():
    # 3 hospitals x 90 patients, 8 s of wearables: about 270 patients in a few seconds
    return simulated_federation(3, 90, 8.0, seed=11)


def _cross_validated(fed, modalities) -> dict:
    """Pooled LR on ``modalities``, every patient scored once on held-out folds."""
    from edge_server.training.metrics import classification_metrics
    labels, probs = [], []
    for fold in range(FOLDS):
        s = restrict_split(split(fed, seed=0, folds=FOLDS, fold=fold), modalities)
        test = s.pooled("test")
        probs.append(baselines.Baseline(modalities, len(CONDITIONS)).fit(s.pooled("train")).predict_proba(test))
        labels.extend(r.label for r in test)
    return classification_metrics(np.array(labels), np.concatenate(probs))


@pytest.mark.parametrize("modality", ["image", "ehr", "signals", "text"])
def test_each_modality_alone_is_clearly_above_chance_on_held_out_patients(federation, modality):
    m = _cross_validated(federation, (modality,))

    assert m["n"] >= 150
    assert m["accuracy"] >= 0.6 and m["accuracy"] >= m["majority_accuracy"] + 0.2, m
    assert m["roc_auc"] >= 0.75, m


def test_fusing_every_modality_is_no_worse_than_the_best_one_alone(federation):
    single = {m: _cross_validated(federation, (m,))["accuracy"] for m in ("image", "ehr", "signals", "text")}

    fused = _cross_validated(federation, ("image", "ehr", "signals", "text"))

    assert fused["accuracy"] >= max(single.values()), (fused["accuracy"], single)
