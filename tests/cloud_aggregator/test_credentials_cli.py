import json

import pytest

from protocols.auth import Registry, Signer
from iomt.supervisor import run_iomt

pytestmark = pytest.mark.integration


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


def test_credentials_refuse_ids_that_are_not_plain(tmp_path):
    out = tmp_path / "fed" / "out"
    for bad in ("../../x", "h1,../escape", "a/b", ".hidden", "x" * 65, "h..1", "party-0", "h1,h1"):
        proc = run_iomt("cloud", "credentials", "--out", str(out), "--hospitals", bad, check=False)
        assert proc.returncode == 2 and "--hospitals" in proc.stderr, (bad, proc.stderr)
    assert not any(tmp_path.rglob("*.json")), "nothing written for a refused id"
    run_iomt("cloud", "credentials", "--out", str(out), "--hospitals", "h1,St-Mary_2.east")
    assert (out / "keys").stat().st_mode & 0o777 == 0o700
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in (out / "keys").iterdir())
    proc = run_iomt("cloud", "credentials", "--out", str(out), "--revoke", "../h1", check=False)
    assert proc.returncode == 2 and "--revoke" in proc.stderr


def test_credentials_give_each_service_its_own_tls_key_and_keep_the_ca(tmp_path):
    """Today's kit gave both parties and the coordinator ONE server key, so one party's
    operator could pose as the other party; and it threw the CA key away."""
    from cryptography import x509

    from protocols.pki import cert_principal

    out = tmp_path / "fed"
    run_iomt("cloud", "credentials", "--out", str(out), "--hospitals", "h1", "--parties", "2",
             "--tls-host", "127.0.0.1", "--tls-host", "localhost")
    hosts = out / "tls" / "hosts"
    certs = {p: x509.load_pem_x509_certificate((hosts / p / "tls.pem").read_bytes())
             for p in ("party-0", "party-1", "coordinator", "h1")}
    assert {p: cert_principal(c) for p, c in certs.items()} == {p: p for p in certs}
    assert len({(hosts / p / "tls.key").read_bytes() for p in certs}) == len(certs)
    assert len({c.public_key().public_numbers() for c in certs.values()}) == len(certs)
    ca = out / "tls" / "ca"
    assert (ca / "ca.key").stat().st_mode & 0o777 == 0o600  # kept: it can sign again
    run_iomt("keys", "init", "--id", "party-1", "--role", "party", "--dir", str(tmp_path / "p1"))
    run_iomt("ca", "sign", "--dir", str(ca), "--csr", str(tmp_path / "p1" / "tls.csr"), "--id", "party-1",
             "--role", "party")
    assert "revoked (superseded)" in run_iomt("ca", "list", "--dir", str(ca)).stdout
