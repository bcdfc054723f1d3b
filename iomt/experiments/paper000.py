"""Source paper 000's experiments: Table II (baselines), Table III (modality ablation),
Table IV (accuracy across rounds) and Fig. 4 (privacy-utility trade-off)."""
from __future__ import annotations

import logging
import math

from iomt.experiments import baselines, report
from iomt.experiments.data import restrict_split
from iomt.experiments.settings import Settings, prepared_runs
from iomt.federation import DP_MODES, run_federation, train_centralized
from protocols.errors import ConfigError

log = logging.getLogger(__name__)

METRICS = report.METRICS
TABLE2_METHODS = ("centralized", "fedavg", "fedprox", "unimodal_federated", "ours", "ours_distributed", "ours_dpsgd",
                  "baselines")
#: Table III: the paper's growing sets of modalities, then each other modality alone, so that
#: the table says what fusion adds over the best single modality.
ABLATION = (("image",), ("image", "ehr"), ("image", "ehr", "signals"), ("image", "ehr", "signals", "text"),
            ("ehr",), ("signals",), ("text",))
ABLATION_NAMES = ("images", "images+ehr", "images+ehr+sensors", "images+ehr+sensors+text", "ehr", "sensors", "text")
FUSED = "images+ehr+sensors+text"
SINGLE = ("images", "ehr", "sensors", "text")
#: Table III's models: ours and the classical baselines on the same modalities' simple features.
TABLE3_MODELS = ("ours", "lr_pooled", "lr_per_hospital")
#: Fig. 4 sweep of DP noise multipliers (0 = no noise, epsilon infinite).
FIG4_NOISE = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
QUICK_FIG4_NOISE = (0.0, 0.1, 1.0)
#: Fig. 4 with DP-SGD: patient-level epsilon targets of the whole run (inf = the same federation without DP).
FIG4_EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
QUICK_FIG4_EPSILONS = (1.0, 8.0, math.inf)


def _evaluate(model_cfg, state, records) -> dict:
    from edge_server.training.loop import evaluate
    if not records:
        return {m: float("nan") for m in METRICS} | {"n": 0}
    return dict(evaluate(model_cfg, state, records))


def _metrics(m: dict) -> dict:
    """The five paper metrics as floats (NaN where undefined, e.g. AUC on a one-class test set)."""
    return {k: float("nan") if m.get(k) is None else float(m[k]) for k in METRICS} | {"n": int(m.get("n") or 0)}


class UnknownMethods(ConfigError, ValueError):
    """``table2 --methods`` named a method that does not exist."""


def table2(settings: Settings, methods: tuple[str, ...] = TABLE2_METHODS) -> dict:
    """Centralized, FedAvg, FedProx, best unimodal federated and ours on held-out patients.

    ``ours`` adds the paper's local DP noise to every update; ``ours_distributed`` splits the
    same noise among the hospitals under secure aggregation (same ε, see edge_server.training.privacy).
    ``baselines`` adds logistic regressions (:mod:`iomt.experiments.baselines`) on the same
    split: pooled and per hospital alone, on the standardised EHR, the notes' TF-IDF and both
    (those whose modalities the data has), as rows ``lr_pooled:FEATURES`` and
    ``lr_per_hospital:FEATURES``.
    ``methods`` picks a subset (every run of a seed uses the same data and split).
    """
    unknown = set(methods) - set(TABLE2_METHODS)
    if unknown:
        raise UnknownMethods(f"unknown table2 methods {sorted(unknown)}; expected some of {TABLE2_METHODS}")
    runs = []
    for seed, fold, fed, cfg, s in prepared_runs(settings):
        test = s.pooled("test")
        base = {"seed": seed, "fold": fold}

        if "centralized" in methods:
            state = train_centralized(cfg, s.pooled("train"), settings.spec("fedavg", seed))
            runs.append(base | {"method": "centralized", "detail": "pooled data, same model"}
                        | _metrics(_evaluate(cfg, state, test)))
        for strategy in ("fedavg", "fedprox"):
            if strategy in methods:
                res = run_federation(cfg, s.train, settings.spec(strategy, seed))
                runs.append(base | {"method": strategy, "detail": "multimodal, secure aggregation, no DP"}
                            | _metrics(_evaluate(cfg, res.state, test)))

        # Unimodal federated: FedAvg on each single modality; the best on *validation* is reported.
        if "unimodal_federated" in methods:
            runs.extend(base | row for row in _best_unimodal(settings, seed, fed, cfg, s))

        for method, mode in (("ours", "local"), ("ours_distributed", "distributed")):
            if method in methods:
                res = run_federation(cfg, s.train, settings.spec("ours", seed, dp_mode=mode))
                detail = f"multimodal + attention + {mode} DP (eps={res.epsilon:.3g}) + SMPC"
                runs.append(base | {"method": method, "detail": detail, "epsilon": res.epsilon}
                            | _metrics(_evaluate(cfg, res.state, test)))
        if "ours_dpsgd" in methods:
            eps = settings.target_epsilon
            row = _dpsgd_selected(settings, seed, cfg, s, eps)
            runs.append(base | {"method": "ours_dpsgd", "epsilon": row["epsilon"],
                                "detail": f"multimodal + attention + patient-level DP-SGD (target eps={eps:g}, "
                                          f"spent {row['epsilon']:.3g}; lr {row['lr']:g}, C {row['clip_norm']:g} "
                                          "chosen on validation patients) + SMPC"}
                        | {k: row[k] for k in (*METRICS, "n")})
        if "baselines" in methods:
            for row in baselines.rows(s, METRICS, len(fed.classes)):
                runs.append(base | {"method": f"{row.pop('baseline')}:{row.pop('features')}"} | row)

    return report.finish(settings, "table2", runs, keys=("method",), values=(*METRICS,),
                   run_columns=("seed", "fold", "method", "detail", *METRICS, "n", "epsilon"),
                   plot=lambda summary: _bars(settings, "table2", summary, "method",
                                              "Table II: methods on held-out patients"))


def _best_unimodal(settings: Settings, seed: int, fed, cfg, s) -> list[dict]:
    """FedAvg on each single modality; the best on *validation*, scored on its test patients."""
    best = None
    for modality in fed.present_modalities():
        sub = restrict_split(s, (modality,))
        if not any(sub.train.values()):
            continue
        res = run_federation(cfg, sub.train, settings.spec("fedavg", seed))
        val = _evaluate(cfg, res.state, sub.pooled("val"))
        log.info("unimodal %s: validation accuracy %.3f", modality, val["accuracy"])
        if best is None or val["accuracy"] > best[0]:
            best = (val["accuracy"], modality, res.state, sub)
    if best is None:
        return []
    _, modality, st, sub = best
    return [{"method": "unimodal_federated", "detail": f"{modality} only (best on validation)"}
            | _metrics(_evaluate(cfg, st, sub.pooled("test")))]


def table3(settings: Settings) -> dict:
    """Ours (DP + SMPC) trained and tested on growing sets of modalities and on each modality
    alone, beside logistic regressions on the same modalities' simple features
    (:mod:`iomt.experiments.baselines`), pooled and per hospital alone.

    The payload's ``fusion`` says, per model, what all four modalities add over the best
    single modality (best by mean test accuracy, which favours the single modality)."""
    runs = []
    for seed, fold, fed, cfg, s in prepared_runs(settings):
        for name, modalities in zip(ABLATION_NAMES, ABLATION):
            sub = restrict_split(s, modalities)
            if not any(sub.train.values()):
                log.warning("no patient has any of %s: skipped", modalities)
                continue
            base = {"seed": seed, "fold": fold, "modalities": name}
            res = run_federation(cfg, sub.train, settings.spec("ours", seed))
            runs.append(base | {"model": "ours", "epsilon": res.epsilon}
                        | _metrics(_evaluate(cfg, res.state, sub.pooled("test"))))
            lr = baselines.rows(sub, METRICS, len(fed.classes), sets={name: modalities})
            runs.extend(base | {"model": row.pop("baseline")} | {k: v for k, v in row.items() if k != "features"}
                        for row in lr)
    payload = report.finish(settings, "table3", runs, keys=("modalities", "model"), values=(*METRICS,),
                            run_columns=("seed", "fold", "modalities", "model", *METRICS, "n", "epsilon"),
                            plot=lambda summary: _bars(settings, "table3",
                                                       [r for r in summary if r["model"] == "ours"], "modalities",
                                                       "Table III: modality ablation (ours)"))
    payload["fusion"] = fusion_gain(payload["summary"])
    report.write_json(settings.out / "table3.json", payload)
    return payload


def fusion_gain(summary: list[dict]) -> dict:
    """model -> the best single modality, its mean test accuracy, the four-modality model's,
    and the gain (fused minus best single; negative when fusion loses)."""
    out = {}
    for model in TABLE3_MODELS:
        rows = {r["modalities"]: r for r in summary if r["model"] == model}
        singles = {n: rows[n]["accuracy_mean"] for n in SINGLE
                   if n in rows and not math.isnan(rows[n]["accuracy_mean"])}
        if FUSED not in rows or not singles:
            continue
        best = max(singles, key=singles.get)
        fused = rows[FUSED]["accuracy_mean"]
        out[model] = {"best_single": best, "best_single_accuracy": singles[best], "fused_accuracy": fused,
                      "gain": fused - singles[best]}
    return out


def table4(settings: Settings) -> dict:
    """Global test accuracy every ``step`` rounds (paper: 10..60) for FedAvg, FedProx and ours."""
    step = max(1, settings.rounds // 6)
    runs = []
    for seed, fold, fed, cfg, s in prepared_runs(settings):
        for method in ("fedavg", "fedprox", "ours"):
            res = run_federation(cfg, s.train, settings.spec(method, seed), eval_records=s.pooled("test"),
                                 eval_every=step)
            for h in res.history:
                if "accuracy" in h:
                    runs.append({"seed": seed, "fold": fold, "method": method, "round": h["round"],
                                 "epsilon": h.get("epsilon")} | _metrics(h))

    def plot(summary):
        rounds = sorted({r["round"] for r in summary})
        series = {}
        for method in ("fedavg", "fedprox", "ours"):
            rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["round"])
            series[method] = ([100 * r["accuracy_mean"] for r in rows], [100 * r["accuracy_std"] for r in rows])
        return report.line_chart(settings.out / "table4.png", rounds, series, "communication round",
                                 "global test accuracy (%)", "Table IV: accuracy across rounds")

    return report.finish(settings, "table4", runs, keys=("method", "round"), values=(*METRICS,),
                   run_columns=("seed", "fold", "method", "round", *METRICS, "n", "epsilon"), plot=plot)


def _dpsgd_selected(settings: Settings, seed: int, cfg, s, epsilon: float) -> dict:
    """Ours with patient-level DP-SGD at ``epsilon`` (``inf``: no DP): every (learning rate, clip
    norm) of the settings' grid is trained, the one with the best accuracy on the pooled
    *validation* patients is kept, and only that one is scored on the test patients. (The
    selection itself is not in the accountant's ε, as is usual for DP-SGD results.)"""
    target = None if math.isinf(epsilon) else epsilon
    grid = [(lr, c) for lr in settings.dp_lrs for c in (settings.dp_clips if target else (1.0,))]
    best = None
    for lr, clip in grid:
        spec = settings.spec("ours", seed, dp_mode="sgd", target_epsilon=target, lr=lr, clip_norm=clip)
        res = run_federation(cfg, s.train, spec)
        val = _evaluate(cfg, res.state, s.pooled("val"))["accuracy"]
        log.info("DP-SGD eps=%s lr=%g C=%g: validation accuracy %.3f", epsilon, lr, clip, val)
        if best is None or val > best[0]:
            best = (val, lr, clip, res)
    val, lr, clip, res = best
    spent = res.epsilon if target is not None else math.inf
    return {"lr": lr, "clip_norm": clip, "val_accuracy": val, "epsilon": spent} \
        | _metrics(_evaluate(cfg, res.state, s.pooled("test")))


def fig4(settings: Settings, noise: tuple[float, ...] | None = None, dp: str = "sgd",
         epsilons: tuple[float, ...] | None = None) -> dict:
    """Privacy-utility trade-off. ``dp="sgd"`` (default): test accuracy of ours with patient-level
    DP-SGD at each target ε (``FIG4_EPSILONS``; learning rate and clip norm chosen on validation
    patients, :func:`_dpsgd_selected`). ``dp="update"``: the paper's update-level noise at several
    noise multipliers, local (every hospital adds ``N(0, (σC)²)``) and distributed under secure
    aggregation (each of the K hospitals adds ``1/K`` of that variance)."""
    if dp == "sgd":
        return _fig4_dpsgd(settings, epsilons or (QUICK_FIG4_EPSILONS if settings.quick else FIG4_EPSILONS))
    noise = noise or (QUICK_FIG4_NOISE if settings.quick else FIG4_NOISE)
    runs = []
    for seed, fold, fed, cfg, s in prepared_runs(settings):
        for mode in DP_MODES:
            for sigma in noise:
                if sigma == 0 and mode != "local":
                    continue  # no noise is the same run in both modes
                res = run_federation(cfg, s.train, settings.spec("ours", seed, noise_multiplier=sigma, dp_mode=mode))
                eps = res.epsilon if res.epsilon is not None and sigma > 0 else math.inf
                runs.append({"seed": seed, "fold": fold, "dp": mode, "noise_multiplier": sigma, "epsilon": eps}
                            | _metrics(_evaluate(cfg, res.state, s.pooled("test"))))

    def plot(summary):
        labels = {"local": "ours, local DP (paper eq. 3)", "distributed": "ours, distributed DP under SMPC"}
        series = [(labels[mode], marker, "epsilon_mean",
                   [r for r in summary if r["dp"] == mode and math.isfinite(r["epsilon_mean"])])
                  for mode, marker in zip(DP_MODES, "os")]
        _fig4_plot(settings, summary, "epsilon_mean", series, "no DP noise (eps = inf)",
                   f"epsilon after {settings.rounds} rounds (delta = 1e-5)", "Fig. 4: privacy-utility trade-off")

    return report.finish(settings, "fig4", runs, keys=("dp", "noise_multiplier"), values=(*METRICS, "epsilon"),
                   run_columns=("seed", "fold", "dp", "noise_multiplier", "epsilon", *METRICS, "n"), plot=plot)


def _fig4_plot(settings: Settings, summary: list[dict], eps_key: str, series, baseline_label: str,
               xlabel: str, title: str, ticks: list[float] | None = None) -> None:
    """Accuracy against epsilon: ``series`` of (label, marker, x key, rows) with error bars, and
    the run without noise (``eps_key`` infinite) as a horizontal line; written to fig4.png."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, marker, x_key, rows in series:
        ax.errorbar([r[x_key] for r in rows], [100 * r["accuracy_mean"] for r in rows],
                    yerr=[100 * r["accuracy_std"] for r in rows], marker=marker, capsize=3, label=label)
    for r in summary:
        if not math.isfinite(r[eps_key]):
            ax.axhline(100 * r["accuracy_mean"], ls="--", color="grey", label=baseline_label)
    if any(rows for *_, rows in series):  # a sweep of epsilon = inf alone has no point to put on a log axis
        ax.set_xscale("log")
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(settings.out / "fig4.png", dpi=110)
    plt.close(fig)


def _fig4_dpsgd(settings: Settings, epsilons: tuple[float, ...]) -> dict:
    runs = []
    for seed, fold, fed, cfg, s in prepared_runs(settings):
        for eps in epsilons:
            row = _dpsgd_selected(settings, seed, cfg, s, eps)
            runs.append({"seed": seed, "fold": fold, "dp": "sgd", "target_epsilon": eps} | row)

    def plot(summary):
        finite = [r for r in summary if math.isfinite(r["target_epsilon"])]
        _fig4_plot(settings, summary, "target_epsilon", [("ours, patient-level DP-SGD", "o", "target_epsilon", finite)],
                   "no DP (eps = inf)", f"patient-level epsilon over {settings.rounds} rounds (delta = 1e-5)",
                   "Fig. 4: privacy-utility trade-off (DP-SGD)", ticks=[r["target_epsilon"] for r in finite])

    return report.finish(settings, "fig4", runs, keys=("dp", "target_epsilon"), values=(*METRICS, "epsilon"),
                         run_columns=("seed", "fold", "dp", "target_epsilon", "epsilon", "lr", "clip_norm",
                                      "val_accuracy", *METRICS, "n"), plot=plot)


def _bars(settings: Settings, name: str, summary: list[dict], key: str, title: str):
    labels = [r[key] for r in summary]
    groups = {m: ([100 * r[f"{m}_mean"] if m != "roc_auc" else 100 * r[f"{m}_mean"] for r in summary],
                  [100 * r[f"{m}_std"] for r in summary]) for m in ("accuracy", "f1", "roc_auc")}
    return report.bar_chart(settings.out / f"{name}.png", labels, [], [], "score (%; AUC x 100)", title, groups)
