"""Export scikit-learn's Wisconsin breast cancer data (BSD licence, shipped inside
scikit-learn, so no download) as a bring-your-own-data folder split non-IID across hospitals.

Its 30 tumour-morphology features are not among the schema's EHR features, so they become
declared extra EHR columns (``dataset.json`` ``ehr_extra``: name -> reference mean and std,
the dataset-wide feature statistics, no labels involved); the model's EHR input is then
``EHR_DIM + 30`` wide (:class:`protocols.model.ModelConfig` ``ehr_dim``) with the schema's
own 12 features absent. Labels keep scikit-learn's classes: ``malignant`` (0), ``benign`` (1).
"""
from __future__ import annotations

import argparse
import csv
import logging
import re
from pathlib import Path

import numpy as np

from edge_server.dataset.byod import ByodSchema, write_labels, write_schema

log = logging.getLogger(__name__)

MIN_PATIENTS = 15


def column_name(feature: str) -> str:
    """``'mean radius'`` -> ``'bc_mean_radius'`` (prefixed so it can never clash with the schema)."""
    return "bc_" + re.sub(r"[^a-z0-9]+", "_", feature.lower()).strip("_")


def dirichlet_split(labels: np.ndarray, n_hospitals: int, alpha: float, seed: int,
                    min_patients: int = MIN_PATIENTS) -> list[np.ndarray]:
    """Indices per hospital with a Dirichlet(alpha) label mix per hospital (non-IID label skew);
    redrawn until every hospital has at least ``min_patients`` patients."""
    if n_hospitals * min_patients > len(labels):
        raise ValueError(f"{len(labels)} patients cannot give {n_hospitals} hospitals {min_patients} each")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_hospitals)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(n_hospitals, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for h, chunk in enumerate(np.split(idx, cuts)):
                parts[h].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_patients:
            return [np.array(sorted(p)) for p in parts]
    raise RuntimeError("could not draw a split with enough patients per hospital; raise alpha")


def export(out: Path | str, n_hospitals: int = 10, alpha: float = 0.5, seed: int = 0,
           fmt: str = "csv") -> dict[str, int]:
    """Write the dataset under ``out`` in the BYOD format; returns patients per hospital."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, y = np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=int)
    names = [column_name(f) for f in data.feature_names]
    mean, std = x.mean(axis=0), x.std(axis=0)
    schema = ByodSchema(classes=tuple(str(c) for c in data.target_names),
                        ehr_extra={n: (float(m), float(s)) for n, m, s in zip(names, mean, std)})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_schema(out, schema, description="scikit-learn breast cancer (Wisconsin diagnostic), BSD licence; "
                                          f"{n_hospitals} hospitals, Dirichlet(alpha={alpha}) label skew, seed {seed}")
    counts = {}
    for h, idx in enumerate(dirichlet_split(y, n_hospitals, alpha, seed)):
        folder = out / f"hospital-{h:02d}"
        folder.mkdir(exist_ok=True)
        ids = [f"bc{i:04d}" for i in idx]
        write_labels(folder, ((pid, schema.classes[y[i]]) for pid, i in zip(ids, idx)))
        rows = [[pid, *(repr(float(v)) for v in x[i])] for pid, i in zip(ids, idx)]
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            cols = {"patient_id": ids} | {n: x[idx, j].tolist() for j, n in enumerate(names)}
            pq.write_table(pa.table(cols), folder / "ehr.parquet")
        else:
            with (folder / "ehr.csv").open("w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["patient_id", *names])
                w.writerows(rows)
        counts[folder.name] = len(idx)
    log.info("exported %d patients to %s: %s", len(y), out, counts)
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write (a folder of hospital folders)")
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more non-IID)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", dest="fmt", choices=("csv", "parquet"), default="csv")


def run(args: argparse.Namespace) -> int:
    counts = export(args.out, args.hospitals, args.alpha, args.seed, args.fmt)
    print(f"wrote {sum(counts.values())} patients in {len(counts)} hospitals to {args.out}")
    return 0
