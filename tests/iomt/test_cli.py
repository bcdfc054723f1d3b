import pytest

from iomt.supervisor import run_iomt


@pytest.mark.integration
def test_help_lists_every_role():
    out = run_iomt("--help").stdout
    for command in ("broker", "device", "simulate", "edge", "cloud", "infer", "demo", "experiment"):
        assert command in out


@pytest.mark.integration
def test_unknown_command_fails():
    proc = run_iomt("no-such-command", check=False)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


@pytest.mark.integration
def test_infer_refuses_a_bad_mask_before_sending_anything(tmp_path):
    """No party runs here: a refusal before sending is the only way this can answer."""
    import numpy as np

    from protocols.auth import make_credentials

    make_credentials(tmp_path / "creds", ["hospital-a"], 2)
    key = tmp_path / "creds" / "keys" / "hospital-a.json"
    for mask, why in ((np.full((1, 4), 0.5), "0 (modality missing) or 1"), (np.zeros((1, 4)), "no modality present")):
        np.savez(tmp_path / "case.npz", features=np.ones((1, 4, 8)), mask=mask)
        proc = run_iomt("infer", "--patient", "p-1", "--input", str(tmp_path / "case.npz"), "--parties",
                        "https://127.0.0.1:9,https://127.0.0.1:9", "--key-file", str(key), check=False)
        assert proc.returncode == 2, proc.stderr
        assert "bad_input" in proc.stderr and why in proc.stderr



def test_main_honours_the_argv_it_is_given(tmp_path, capsys, monkeypatch):
    """Called in-process, `main` must parse its own argv, not the test runner's sys.argv."""
    import json

    from edge_server.ingest.sqlite_store import SqliteStore
    from iomt.cli import main

    SqliteStore(tmp_path).close()
    monkeypatch.setattr("sys.argv", ["pytest", "-q", "tests/iomt"])
    assert main(["edge", "status", "--data-dir", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["stored"]["total"] == 0 and status["rejected_total"] == 0
