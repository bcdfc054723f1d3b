"""Writing experiment results: per-run CSV, a mean/std summary CSV, JSON and PNG plots."""
from __future__ import annotations

import csv
import json
import logging
import math
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "roc_auc")


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Rows as CSV with ``columns`` (default: the keys of the first row, in order)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})
    return path


def _fmt(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def summarise(runs: Iterable[dict], keys: Sequence[str], values: Sequence[str]) -> list[dict]:
    """Group ``runs`` by ``keys`` and give ``<value>_mean``, ``<value>_std`` (sample std) and ``n_runs``.

    Groups keep the order in which they first appear.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in keys), []).append(run)
    out = []
    for group_key, members in groups.items():
        row = dict(zip(keys, group_key))
        for v in values:
            xs = np.array([m[v] for m in members if m.get(v) is not None and not _isnan(m[v])], dtype=float)
            row[f"{v}_mean"] = float(xs.mean()) if xs.size else float("nan")
            row[f"{v}_std"] = float(xs.std(ddof=1)) if xs.size > 1 else 0.0 if xs.size else float("nan")
        row["n_runs"] = len(members)
        out.append(row)
    return out


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def summary_columns(keys: Sequence[str], values: Sequence[str]) -> list[str]:
    return [*keys, *(f"{v}_{s}" for v in values for s in ("mean", "std")), "n_runs"]


def environment() -> dict:
    """Where and when a result was measured (for RESULTS.md)."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    import torch
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "command": " ".join(["iomt", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("iomt", "__main__.py") else None,
    }


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def bar_chart(path: Path, labels: Sequence[str], means: Sequence[float], stds: Sequence[float],
              ylabel: str, title: str, groups: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> Path:
    """A bar chart with error bars; ``groups`` draws several bars per label (name -> (means, stds))."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 3.6))
    series = groups or {ylabel: (means, stds)}
    width = 0.8 / len(series)
    x = np.arange(len(labels))
    for i, (name, (m, s)) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, m, width, yerr=s, capsize=3, label=name)
    ax.set_xticks(x, labels, rotation=15 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if groups:
        ax.legend()
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_chart(path: Path, xs: Sequence[float], series: dict[str, tuple[Sequence[float], Sequence[float]]],
               xlabel: str, ylabel: str, title: str, logx: bool = False) -> Path:
    """Lines with shaded ±std bands, one per series (name -> (means, stds))."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, (m, s) in series.items():
        m, s = np.asarray(m, float), np.asarray(s, float)
        ax.plot(xs, m, marker="o", label=name)
        ax.fill_between(xs, m - s, m + s, alpha=0.2)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)


def finish(settings, name: str, runs: list[dict], keys, values, run_columns, plot) -> dict:
    """Write ``NAME_runs.csv``, ``NAME.csv`` (mean/std), ``NAME.json`` and ``NAME.png``."""
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{name}_runs.csv", runs, run_columns)
    summary = summarise(runs, keys, values)
    write_csv(out / f"{name}.csv", summary, summary_columns(keys, values))
    plot(summary)
    payload = {"experiment": name, "settings": settings.describe(), "environment": environment(),
               "summary": summary, "runs": runs}
    write_json(out / f"{name}.json", payload)
    log.info("%s: wrote %s", name, out)
    return payload
