"""The edge accepts a bring-your-own-data hospital folder wherever it reads patients."""
from __future__ import annotations

import json

import pytest

from edge_server.dataset.byod import load_federation_folder
from edge_server.training.data import split_records
from iomt.experiments import baselines
from protocols.model import ModelConfig
from protocols.schema import EHR_FEATURES
from iomt.supervisor import run_iomt

pytestmark = pytest.mark.integration


def test_edge_trains_and_predicts_from_a_byod_folder(tmp_path):
    # Prepare: the whole breast cancer set as one hospital (about 85 test patients), and a
    # logistic regression on the edge's own split of it, the floor a trained model must reach
    run_iomt("experiment", "export-breast-cancer", "--hospitals", "1", "--out", str(tmp_path / "bc"))
    folder = tmp_path / "bc" / "hospital-00"
    _, hospitals = load_federation_folder(tmp_path / "bc")
    train, _, test = split_records(hospitals["hospital-00"], seed=0)
    floor = baselines.score(baselines.Baseline(("ehr",), 2).fit(train), test)
    # Execute
    out = run_iomt("edge", "train", "--data-dir", str(folder), "--epochs", "15", "--lr", "0.01",
                   "--json", "--no-progress")
    result = json.loads(out.stdout)
    # Assert: far above always answering "benign", and within a few points of the regression
    assert result["patients"]["test"] == floor["n"] >= 80
    assert result["test"]["accuracy"] >= result["test"]["majority_accuracy"] + 0.2, result["test"]
    assert result["test"]["accuracy"] >= floor["accuracy"] - 0.05, (result["test"], floor)
    patient = (folder / "labels.csv").read_text().splitlines()[1].split(",")[0]
    pred = json.loads(run_iomt("edge", "predict", "--data-dir", str(folder), "--patient", patient,
                               "--json").stdout)
    assert abs(sum(pred["probabilities"].values()) - 1) < 1e-5


def test_bad_byod_folder_names_the_file_and_row(tmp_path):
    run_iomt("experiment", "export-breast-cancer", "--out", str(tmp_path / "bc"))
    folder = tmp_path / "bc" / "hospital-01"
    lines = (folder / "labels.csv").read_text().splitlines()
    lines[2] = lines[2].split(",")[0] + ",not-a-class"
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    proc = run_iomt("edge", "train", "--data-dir", str(folder), "--json", check=False)
    assert proc.returncode == 2
    assert "labels.csv" in proc.stderr and "row 2" in proc.stderr


def test_federation_model_file_takes_the_byod_widths_and_text_encoder(tmp_path):
    # Arrange: a BYOD hospital folder (30 EHR features, 2 classes)
    run_iomt("experiment", "export-breast-cancer", "--out", str(tmp_path / "bc"))
    folder = tmp_path / "bc" / "hospital-00"
    schema = json.loads((tmp_path / "bc" / "dataset.json").read_text())
    model_file = tmp_path / "model.json"

    # Act
    run_iomt("edge", "federate", "--write-model", str(model_file), "--data-dir", str(folder),
             "--text-encoder", "minilm", "--fusion", "quadratic")

    # Assert: the coordinator's model fits the folder, not the simulated schema
    config = json.loads(model_file.read_text())["config"]
    assert config["num_classes"] == len(schema["classes"]) == 2
    assert config["ehr_dim"] == len(EHR_FEATURES) + len(schema["ehr_extra"]) != ModelConfig().ehr_dim
    assert config["text_encoder"] == "minilm"
    assert config["fusion"] == "quadratic"  # the MPC-friendly head, for fast encrypted inference
    assert {"fusion.score_weight", "head.3.weight"} <= {n for n, _ in json.loads(model_file.read_text())["spec"]}


def test_federation_model_file_rejects_an_unreadable_config(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    proc = run_iomt("edge", "federate", "--write-model", str(tmp_path / "m.json"),
                    "--model-config", str(tmp_path / "bad.json"), check=False)
    assert proc.returncode == 2
    assert "model configuration" in proc.stderr
    assert not (tmp_path / "m.json").exists()
