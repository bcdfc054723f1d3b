"""Classification metrics per hospital: accuracy, macro precision/recall/F1, macro OvR ROC AUC."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Metrics of class probabilities ``probs`` ``(N, K)`` against integer ``labels`` ``(N,)``.

    ROC AUC is one-vs-rest, averaged over the classes that have both positives and
    negatives among ``labels`` (``None`` when no class does, e.g. a single-class test set).
    Also reports the accuracy of always predicting the majority class, as a baseline.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n = int(len(labels))
    if n == 0:
        return {"n": 0, "accuracy": None, "precision": None, "recall": None, "f1": None,
                "roc_auc": None, "majority_accuracy": None}
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, pred, average="macro", zero_division=0)  # over classes seen in truth or prediction
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in range(k) if 0 < (labels == c).sum() < n]
    return {
        "n": n,
        "accuracy": float(accuracy_score(labels, pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": float(np.mean(aucs)) if aucs else None,
        "majority_accuracy": float(np.bincount(labels, minlength=k).max() / n),
    }
