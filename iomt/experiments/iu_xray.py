"""Convert the Indiana University chest X-ray reports (Open-i, "IU X-ray") into a
bring-your-own-data folder of hospitals whose only modality is the note (``docs/byod.md``).

Data: the reports CSV of the collection (Demner-Fushman et al., "Preparing a collection of
radiology examinations for distribution and retrieval", JAMIA 2016) in the layout of the
Kaggle copy ``raddar/chest-xrays-indiana-university``: ``indiana_reports.csv`` with columns
``uid,MeSH,Problems,image,indication,comparison,findings,impression``, one row per report
(3,851 rows). No Python package ships it; copies sit in public repositories, e.g.
``github.com/SaadSubhaniTheProgrammerVersion/Textual-Report-Generation-from-Chest-X-rays-Indiana-Dataset``,
file ``indiana_reports.csv`` at commit ``a3d4e703db3f1a54c91a265653771eb295fd5241``
(SHA-256 ``fd718e074451e93effedd868ca8995d2495e58e85878e08853f2dd35810f2149``), a repository without a licence file.

**Licence**: unclear for these copies, so the reports are for evaluation only. Nothing of
them (no report, no excerpt, no converted folder) is committed to this repository; keep the
CSV and the folder this writes outside any git work tree (:func:`export` refuses to write
inside one unless told otherwise).

Task: the FINDINGS section is the note; a report is ``normal`` when its MeSH and Problems
fields are both exactly ``normal`` and ``abnormal`` otherwise; reports with an empty findings
section are dropped (3,337 remain, 1,197 normal); the rest are dealt to ``hospitals``
hospitals with a Dirichlet(``alpha``) label mix (:func:`iomt.experiments.breast_cancer.dirichlet_split`).

Usage::

    python -m iomt.experiments.iu_xray --reports indiana_reports.csv --out IU_FOLDER
    iomt experiment table2 --data IU_FOLDER --methods fedavg,centralized,baselines --seeds 3
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_server.dataset.byod import ByodSchema, write_labels, write_schema
from iomt.experiments.breast_cancer import dirichlet_split
from protocols.errors import IomtError

log = logging.getLogger(__name__)

CLASSES = ("normal", "abnormal")
COLUMNS = ("uid", "MeSH", "Problems", "findings")
NORMAL = "normal"


class ReportsError(IomtError, ValueError):
    """The reports CSV is not in the expected layout; names the file and, for rows, the row."""


@dataclass(frozen=True, slots=True)
class Report:
    """One kept report: its uid, its findings section (the note) and whether it is normal."""

    uid: int
    findings: str
    normal: bool

    @property
    def patient_id(self) -> str:
        return f"iu{self.uid:05d}"


def read_reports(path: Path | str) -> tuple[list[Report], int]:
    """The reports with a non-empty findings section, and how many were dropped without one.

    Raises
    ------
    ReportsError
        when a needed column is missing, a uid is not a positive integer or repeats, or a row
        has the wrong number of fields (data rows count from 1).
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ReportsError(f"{path}: missing column(s) {missing}; expected at least {list(COLUMNS)}")
            kept, dropped, seen = [], 0, set()
            for row_no, row in enumerate(reader, start=1):
                if None in row or any(v is None for v in row.values()):
                    raise ReportsError(f"{path}, row {row_no}: wrong number of fields")
                try:
                    uid = int(row["uid"])
                except ValueError:
                    uid = -1
                if uid <= 0 or uid in seen:
                    raise ReportsError(f"{path}, row {row_no}: uid {row['uid']!r} is not a new positive integer")
                seen.add(uid)
                findings = row["findings"].strip()
                if not findings:
                    dropped += 1
                    continue
                normal = row["MeSH"].strip() == NORMAL and row["Problems"].strip() == NORMAL
                kept.append(Report(uid, findings, normal))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ReportsError(f"{path}: not a readable UTF-8 CSV ({err})") from err
    if not kept:
        raise ReportsError(f"{path}: no report has a findings section")
    return kept, dropped


def inside_git_work_tree(path: Path) -> bool:
    """Whether ``path`` (or the folder it would be created in) lies inside a git work tree."""
    return any((p / ".git").exists() for p in (path.resolve(), *path.resolve().parents))


def export(reports_csv: Path | str, out: Path | str, n_hospitals: int = 4, alpha: float = 1.0, seed: int = 0,
           allow_git: bool = False) -> dict[str, dict[str, int]]:
    """Write the kept reports under ``out`` as BYOD hospital folders (``labels.csv`` and
    ``notes/<patient_id>.txt`` only); returns ``{hospital: {"normal": n, "abnormal": m}}``.

    ``allow_git=False`` refuses an ``out`` inside a git work tree, where the reports could be
    committed by mistake (their licence is unclear).
    """
    out = Path(out)
    if not allow_git and inside_git_work_tree(out):
        raise ReportsError(f"{out} is inside a git work tree: write the reports elsewhere (licence unclear, "
                           "never commit them)")
    reports, dropped = read_reports(reports_csv)
    labels = np.array([0 if r.normal else 1 for r in reports])
    out.mkdir(parents=True, exist_ok=True)
    write_schema(out, ByodSchema(classes=CLASSES),
                 description=f"IU chest X-ray reports (Open-i), findings section as the note; evaluation only, "
                             f"licence unclear; {n_hospitals} hospitals, Dirichlet(alpha={alpha}) label mix, "
                             f"seed {seed}")
    counts: dict[str, dict[str, int]] = {}
    for h, idx in enumerate(dirichlet_split(labels, n_hospitals, alpha, seed)):
        folder = out / f"hospital-{h:02d}"
        (folder / "notes").mkdir(parents=True, exist_ok=True)
        write_labels(folder, ((reports[i].patient_id, CLASSES[labels[i]]) for i in idx))
        for i in idx:
            (folder / "notes" / f"{reports[i].patient_id}.txt").write_text(reports[i].findings + "\n",
                                                                           encoding="utf-8")
        counts[folder.name] = {c: int((labels[idx] == k).sum()) for k, c in enumerate(CLASSES)}
    log.info("kept %d reports (%d without findings dropped) in %d hospitals under %s",
             len(reports), dropped, n_hospitals, out)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iomt.experiments.iu_xray", description=__doc__.splitlines()[0])
    parser.add_argument("--reports", required=True, help="indiana_reports.csv (uid,MeSH,Problems,...,findings,...)")
    parser.add_argument("--out", required=True, help="folder to write (a folder of hospital folders)")
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (smaller = more non-IID)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inside-git-ok", dest="allow_git", action="store_true",
                        help="allow --out inside a git work tree (never commit the reports: licence unclear)")
    args = parser.parse_args(argv)
    try:
        counts = export(args.reports, args.out, args.hospitals, args.alpha, args.seed, args.allow_git)
    except (ReportsError, ValueError, OSError) as err:
        print(f"iu_xray: {err}", file=sys.stderr)
        return 1
    total = {c: sum(n[c] for n in counts.values()) for c in CLASSES}
    print(f"wrote {sum(total.values())} reports ({total}) in {len(counts)} hospitals to {args.out}")
    for hospital, n in counts.items():
        print(f"  {hospital}: {sum(n.values())} reports, {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
