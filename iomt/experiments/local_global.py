"""Source paper 001's comparison: per hospital, a model trained on that hospital's data
alone against the federated global model, both scored on that hospital's test patients.

Beside them, two logistic regressions (:mod:`iomt.experiments.baselines`) on the classical
features the data has (standardised EHR and the notes' TF-IDF; EHR alone for tabular data):
``local_lr`` trained on that hospital's training patients alone, ``pooled_lr`` on every
hospital's, both scored on that hospital's test patients."""
from __future__ import annotations

import logging

import numpy as np

from iomt.experiments import baselines, report
from iomt.experiments.settings import Settings, prepared_runs
from iomt.federation import run_federation, train_centralized

log = logging.getLogger(__name__)

MODELS = ("local", "local_lr", "pooled_lr", "global_fedavg", "global_ours")
GLOBAL = ("global_fedavg", "global_ours")


def local_vs_global(settings: Settings) -> dict:
    from edge_server.training.loop import evaluate

    runs = []
    lr_features = None
    for seed, fold, fed, cfg, s in prepared_runs(settings):
        sets = baselines.available(s)
        lr_features = max(sets, key=lambda name: len(sets[name])) if sets else None
        pooled_lr = (baselines.Baseline(sets[lr_features], len(fed.classes)).fit(s.pooled("train"))
                     if lr_features else None)
        globals_ = {
            "global_fedavg": run_federation(cfg, s.train, settings.spec("fedavg", seed)).state,
            "global_ours": run_federation(cfg, s.train, settings.spec("ours", seed)).state,
        }
        for hospital, test in s.test.items():
            if not test or not s.train[hospital]:
                log.warning("%s has no training or test patients: skipped", hospital)
                continue
            # Local-only: the same model and the same number of epochs, on this hospital alone.
            local = train_centralized(cfg, s.train[hospital], settings.spec("fedavg", seed))
            row = {"seed": seed, "fold": fold, "hospital": hospital, "n_train": len(s.train[hospital]),
                   "n_test": len(test)}
            for name, state in {"local": local, **globals_}.items():
                m = evaluate(cfg, state, test)
                row[f"{name}_accuracy"] = float(m["accuracy"])
                row[f"{name}_f1"] = float(m["f1"])  # n_test >= 1, so both are defined
            lrs = {"local_lr": baselines.Baseline(sets[lr_features], len(fed.classes)).fit(s.train[hospital]),
                   "pooled_lr": pooled_lr} if lr_features else {}
            for name in ("local_lr", "pooled_lr"):
                m = baselines.score(lrs[name], test) if name in lrs else {"accuracy": None, "f1": None}
                row[f"{name}_accuracy"] = float("nan") if m["accuracy"] is None else float(m["accuracy"])
                row[f"{name}_f1"] = float("nan") if m["f1"] is None else float(m["f1"])
            runs.append(row)

    values = [f"{m}_{k}" for m in MODELS for k in ("accuracy", "f1")]

    def plot(summary):
        labels = [r["hospital"].replace("hospital-", "H") for r in summary]
        groups = {m: ([100 * r[f"{m}_accuracy_mean"] for r in summary],
                      [100 * r[f"{m}_accuracy_std"] for r in summary]) for m in MODELS}
        return report.bar_chart(settings.out / "local_vs_global.png", labels, [], [], "test accuracy (%)",
                                "Local-only vs global model, per hospital", groups)

    payload = report.finish(settings, "local_vs_global", runs, keys=("hospital",), values=values,
                            run_columns=("seed", "fold", "hospital", "n_train", "n_test", *values), plot=plot)
    payload["overall"] = {v: float(np.nanmean([r[v] for r in runs])) for v in values} if runs else {}
    payload["lr_features"] = lr_features
    payload["global_beats_local"] = {
        m: sum(r[f"{m}_accuracy_mean"] > r["local_accuracy_mean"] for r in payload["summary"])
        for m in GLOBAL} | {"hospitals": len(payload["summary"])}
    report.write_json(settings.out / "local_vs_global.json", payload)
    return payload
