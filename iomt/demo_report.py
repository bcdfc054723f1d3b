"""The report `iomt demo` leaves behind: report.json, report.md and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")


def _num(value, fmt: str = ".3f") -> str:
    """A metric for a table; '-' where it is undefined (e.g. AUC on a one-class split)."""
    return "-" if value is None or value != value else format(value, fmt)


def _plot_rounds(out: Path, federation: dict) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for h, res in federation.items():
        hist = res.get("history") or []
        if hist:
            ax.plot([e["version"] for e in hist], [e["val"].get("accuracy", float("nan")) for e in hist],
                    marker="o", label=h)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("federated round (global model version)")
    ax.set_ylabel("validation accuracy at the hospital")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Global model on each hospital's own validation patients", fontsize=10)
    path = out / "rounds.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_inference(out: Path, inference: dict) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not inference:
        return None
    plain = inference["plaintext"]["probabilities"]
    plain = plain if isinstance(plain, dict) else plain[0]
    enc = inference["encrypted"]["probabilities"][0]
    labels = list(enc)
    x = range(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar([i - 0.2 for i in x], [plain[k] for k in labels], width=0.4, label="plaintext (edge, ONNX)")
    axes[0].bar([i + 0.2 for i in x], [enc[k] for k in labels], width=0.4, label="encrypted (cloud, CrypTen)")
    axes[0].set_xticks(list(x), labels)
    axes[0].set_ylabel("probability")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"patient {inference['patient']}")
    weights = inference["encrypted"].get("modality_weights")
    if weights:
        w = weights[0]
        axes[1].bar(list(w), list(w.values()), color="tab:green")
        axes[1].set_ylabel("attention weight")
        axes[1].set_title("modality weights (encrypted path)")
    path = out / "inference.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _dp_setting(s: dict) -> str:
    mode = s.get("dp", "update")
    if mode == "sgd":
        return f"patient-level DP-SGD at a target epsilon of {s.get('epsilon')} (delta 1e-5) for the whole run"
    if mode == "update":
        return f"update-level DP (clip {s.get('clip_norm')}, noise multiplier {s.get('noise_multiplier')})"
    return "no differential privacy"


def _dp_meaning(s: dict, report: dict) -> str:
    """What the epsilon column means, in words."""
    mode = s.get("dp", "update")
    if mode == "sgd":
        return ("epsilon is each hospital's privacy ledger after the last round, at delta = 1e-5, for one patient: "
                "every local step clipped each sampled patient's gradient and added Gaussian noise (DP-SGD), and "
                "the accountant composed every step of every round. Whatever anyone later sees of the model, "
                "the chance of any outcome changes by at most a factor e^epsilon (plus delta) whether or not a "
                "given patient's records were used. epsilon <= 8 is a common bound for deployed models "
                "(smaller is stronger: 1 is strong, 8 moderate); with the demo's few dozen patients per "
                "hospital, that noise costs accuracy, which `iomt experiment fig4` measures on larger data.")
    if mode == "update":
        return ("epsilon is the privacy accountant's value at delta = 1e-5 for the updates each hospital released "
                "(the source paper's clip C and Gaussian noise sigma*C on the whole update, eq. 3). Noise strong "
                "enough for a small epsilon drowns the update (its norm is about sigma*C*sqrt(d) against at most "
                "C), so small sigmas give nominal epsilons; patient-level DP-SGD (--dp sgd) is the default.")
    return "No differential privacy: the models say whatever the training data lets them say."


def _spent(res: dict) -> dict | None:
    """The last round's privacy figures a hospital's `iomt edge federate` reported (None: no DP)."""
    return next((r["train_metrics"] for r in reversed(res.get("rounds", [])) if "epsilon" in r["train_metrics"]),
                None)


def privacy_summary(report: dict) -> str:
    """One line: the ε each hospital spent, its unit and δ, and what it means."""
    spent = {h: _spent(res) for h, res in report.get("federation", {}).items()}
    if not any(spent.values()):
        return "privacy: no differential privacy (epsilon = inf): the models may reveal any patient's records"
    parts = [f"{h} {'inf' if m['epsilon'] in (None, float('inf')) else format(m['epsilon'], '.2f')}"
             f"{'' if m.get('epsilon_budget') is None else ' of ' + format(m['epsilon_budget'], 'g')}"
             if m else f"{h} (no DP)" for h, m in spent.items()]
    first = next(m for m in spent.values() if m)
    unit, delta = first.get("privacy_unit", "patient"), first.get("delta", 1e-5)
    meaning = (f"whatever anyone sees of what a hospital released, any outcome is at most e^epsilon times more "
               f"(or less) likely with one {unit}'s records than without them, except with probability "
               f"delta = {delta:g}")
    return f"privacy: epsilon spent ({unit} level, delta = {delta:g}): {', '.join(parts)}; {meaning}"


def _markdown(report: dict, plots: dict[str, Path | None]) -> str:
    s = report["settings"]
    lines = ["# iomt demo report", "",
             f"{len(report['hospitals'])} hospitals, {s['patients']} patients each, {s['parties']} cloud parties, "
             f"{s['rounds']} rounds of {s['epochs']} local epochs, {s.get('fusion', 'attention')} fusion, "
             f"{_dp_setting(s)}; wall time {report.get('wall_s', 0):.0f} s.", "",
             "## Devices to edge", "", "| hospital | published | stored | rejected |", "|---|---|---|---|"]
    for h, ing in report.get("ingest", {}).items():
        lines.append(f"| {h} | {sum(ing['published'].values())} | {ing['stored']['total']} | "
                     f"{sum(ing['rejected'].values()) if ing['rejected'] else 0} |")
    lines += ["", "## Federated rounds (secure aggregation, DP)", "",
              "| hospital | rounds | uploaded MB | epsilon spent | " + " | ".join(f"val {m}" for m in METRICS) + " |",
              "|---|---|---|---|" + "---|" * len(METRICS)]
    for h, res in report.get("federation", {}).items():
        rounds = res.get("rounds", [])
        eps = (_spent(res) or {}).get("epsilon")
        val = res.get("global", {}).get("val", {})
        lines.append(f"| {h} | {len(rounds)} | {sum(r['uploaded_bytes'] for r in rounds) / 1e6:.2f} | "
                     f"{_num(eps, '.2f')} | " + " | ".join(_num(val.get(m)) for m in METRICS) + " |")
    lines += ["", privacy_summary(report) + ".", "", _dp_meaning(s, report)]
    if plots.get("rounds"):
        lines += ["", "![validation accuracy per round](rounds.png)"]
    inf = report.get("inference")
    if inf:
        lines += ["", "## Clinician's encrypted inference", "",
                  f"Patient {inf['patient']} of {inf['hospital']} (held out; modalities: "
                  f"{', '.join(inf['modalities'])}). Encrypted prediction **{inf['encrypted']['prediction'][0]}**, "
                  f"same class as the plaintext prediction: {inf['same_class']}; largest probability difference "
                  f"{inf['max_prob_diff']:.4f}; {inf['encrypted']['rounds']} communication rounds, "
                  f"{inf['encrypted']['bytes'] / 1e6:.2f} MB between parties, {inf['client_wall_s']:.1f} s at the client."]
        if plots.get("inference"):
            lines += ["", "![encrypted vs plaintext](inference.png)"]
    lines += ["", "Logs of every process are in `logs/`; the raw figures are in `report.json`.", ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> dict[str, Path]:
    plots = {"rounds": _plot_rounds(out, report.get("federation", {})),
             "inference": _plot_inference(out, report.get("inference", {}))}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    md = out / "report.md"
    md.write_text(_markdown(report, plots))
    return {"markdown": md, "json": out / "report.json", **{k: v for k, v in plots.items() if v}}
