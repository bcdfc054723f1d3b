"""Source paper 001's comparison: per hospital, a model trained on that hospital's data
alone against the federated global model, both scored on that hospital's test patients."""
from __future__ import annotations

import logging

import numpy as np

from iomt.experiments import report
from iomt.experiments.settings import Settings, prepared_runs
from iomt.federation import run_federation, train_centralized

log = logging.getLogger(__name__)

MODELS = ("local", "global_fedavg", "global_ours")


def local_vs_global(settings: Settings) -> dict:
    from edge_server.training.loop import evaluate

    runs = []
    for seed, fold, fed, cfg, s in prepared_runs(settings):
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
    payload["overall"] = {v: float(np.mean([r[v] for r in runs])) for v in values} if runs else {}
    payload["global_beats_local"] = {
        m: sum(r[f"{m}_accuracy_mean"] > r["local_accuracy_mean"] for r in payload["summary"])
        for m in MODELS[1:]} | {"hospitals": len(payload["summary"])}
    report.write_json(settings.out / "local_vs_global.json", payload)
    return payload
