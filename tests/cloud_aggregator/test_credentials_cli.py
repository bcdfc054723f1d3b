import json

from protocols.auth import Registry, Signer
from tests.utils.procs import run_iomt


def test_credentials_make_working_keys_and_revoke(tmp_path):
    out = tmp_path / "fed"
    run_iomt("cloud", "credentials", "--out", str(out), "--hospitals", "h1,h2", "--parties", "3",
             "--tls-host", "127.0.0.1")
    reg = json.loads((out / "registry.json").read_text())
    assert set(reg["principals"]) == {"h1", "h2", "party-0", "party-1", "party-2", "coordinator"}
    assert all("private_key" not in p for p in reg["principals"].values())  # registry is public
    assert any((out / "tls").glob("ca*"))
    token = Signer.from_file(out / "keys" / "h1.json").headers("party-0")["Authorization"]
    assert Registry(out / "registry.json").verify_header(token, "party-0", ("hospital",)).sub == "h1"
    again = run_iomt("cloud", "credentials", "--out", str(out), "--hospitals", "h1", check=False)
    assert again.returncode == 2 and "refusing" in again.stderr
    run_iomt("cloud", "credentials", "--out", str(out), "--revoke", "h2")
    assert "h2" in json.loads((out / "registry.json").read_text())["revoked"]


def test_credentials_declare_a_hospitals_max_samples(tmp_path):
    out = tmp_path / "fed"
    run_iomt("cloud", "credentials", "--out", str(out), "--hospitals", "h1,h2", "--parties", "2")
    run_iomt("cloud", "credentials", "--out", str(out), "--max-samples", "h1=5000")
    registry = Registry(out / "registry.json")
    assert registry.max_samples("h1") == 5000 and registry.max_samples("h2") is None
    bad = run_iomt("cloud", "credentials", "--out", str(out), "--max-samples", "party-0=5", check=False)
    assert bad.returncode == 2 and "not a hospital" in bad.stderr
    run_iomt("cloud", "credentials", "--out", str(out), "--max-samples", "h1=none")
    assert Registry(out / "registry.json").max_samples("h1") is None
