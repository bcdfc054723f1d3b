"""The IU X-ray reports converter on a tiny synthetic CSV (no real report is used here)."""
from __future__ import annotations

import csv

import pytest

from edge_server.dataset.byod import load_federation_folder
from iomt.experiments.iu_xray import CLASSES, ReportsError, export, main, read_reports

HEADER = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]


def write_reports(path, n=60):
    """``n`` invented reports: every third normal, every fifth without findings, one whose
    MeSH says normal but whose Problems field does not."""
    rows = []
    for uid in range(1, n + 1):
        normal = uid % 3 == 0
        findings = "" if uid % 5 == 0 else (f"clear lungs case {uid}" if normal else f"opacity, effusion {uid}")
        mesh = "normal" if normal else "Opacity/lung;Pleural Effusion"
        rows.append([uid, mesh, mesh if uid != 3 else "Opacity", "PA", "cough", "None", findings, "impression"])
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(rows)


def test_export_keeps_findings_as_the_only_modality(tmp_path):
    write_reports(tmp_path / "reports.csv")

    counts = export(tmp_path / "reports.csv", tmp_path / "byod", n_hospitals=2, alpha=1.0, seed=0)
    schema, hospitals = load_federation_folder(tmp_path / "byod")

    records = {r.patient_id: r for recs in hospitals.values() for r in recs}
    kept = [uid for uid in range(1, 61) if uid % 5]
    assert sorted(records) == sorted(f"iu{uid:05d}" for uid in kept)  # empty findings dropped
    assert schema.classes == CLASSES
    normal = {uid for uid in kept if uid % 3 == 0 and uid != 3}  # uid 3: Problems is not "normal"
    for uid in kept:
        rec = records[f"iu{uid:05d}"]
        assert rec.modalities() == ("text",)
        assert rec.label == (0 if uid in normal else 1)
        assert str(uid) in rec.note and ("clear lungs" in rec.note) == (uid % 3 == 0)
    assert sum(sum(n.values()) for n in counts.values()) == len(kept)
    assert sum(n["normal"] for n in counts.values()) == len(normal)
    assert {h: len(r) for h, r in hospitals.items()} == {h: sum(n.values()) for h, n in counts.items()}


def test_read_reports_counts_dropped(tmp_path):
    write_reports(tmp_path / "reports.csv", n=10)

    kept, dropped = read_reports(tmp_path / "reports.csv")

    assert dropped == 2 and [r.uid for r in kept] == [1, 2, 3, 4, 6, 7, 8, 9]


@pytest.mark.parametrize("body, message", [
    ("uid,MeSH,findings\n1,normal,clear\n", "missing column"),
    (",".join(HEADER) + "\n1,normal,normal,PA,x,y,clear,z\n1,normal,normal,PA,x,y,clear,z\n", "row 2"),
    (",".join(HEADER) + "\nabc,normal,normal,PA,x,y,clear,z\n", "row 1"),
    (",".join(HEADER) + "\n1,normal,normal,PA,x,y,clear\n", "wrong number of fields"),
])
def test_bad_reports_csv_is_refused_with_the_row(tmp_path, body, message):
    (tmp_path / "reports.csv").write_text(body, encoding="utf-8")

    with pytest.raises(ReportsError, match=message):
        read_reports(tmp_path / "reports.csv")


def test_refuses_to_write_inside_a_git_work_tree(tmp_path, capsys):
    write_reports(tmp_path / "reports.csv")
    (tmp_path / "repo" / ".git").mkdir(parents=True)

    rc = main(["--reports", str(tmp_path / "reports.csv"), "--out", str(tmp_path / "repo" / "data")])

    assert rc == 1 and "git work tree" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "data").exists()
    export(tmp_path / "reports.csv", tmp_path / "repo" / "data", n_hospitals=2, allow_git=True)
    assert (tmp_path / "repo" / "data" / "hospital-01" / "labels.csv").exists()


def test_table2_runs_on_the_converted_folder(tmp_path):
    import dataclasses

    import torch

    from iomt.experiments import run_experiment
    from iomt.experiments.settings import Settings
    torch.set_num_threads(1)
    write_reports(tmp_path / "reports.csv", n=90)
    export(tmp_path / "reports.csv", tmp_path / "byod", n_hospitals=2, seed=0)
    settings = dataclasses.replace(Settings.quick_preset(tmp_path / "out"), data=tmp_path / "byod")

    payload = run_experiment("table2", settings, methods=("fedavg", "baselines"))

    methods = {r["method"]: r for r in payload["summary"]}
    assert set(methods) == {"fedavg", "lr_pooled:text", "lr_per_hospital:text"}
    assert methods["lr_pooled:text"]["accuracy_mean"] == 1.0  # invented notes name their class
    assert all(r["n"] > 0 for r in payload["runs"])
