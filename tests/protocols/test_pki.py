"""The federation's CA and a host's keys (protocols.pki), without processes: what the CA and
`iomt keys install` refuse, and what a certificate binds."""
from __future__ import annotations

import ipaddress
import json

import pytest
from cryptography import x509

from protocols.auth import Registry, Signer, declare_max_samples
from protocols.pki import (CertificateAuthority, PkiError, cert_names, cert_principal, init_host, install_cert,
                           register)


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.init(tmp_path / "ca")


def test_a_certificate_binds_the_id_and_both_kinds_of_names(ca, tmp_path):
    host = init_host(tmp_path / "p0", "party-0", "party", ["p0.example", "10.0.0.5", "2001:db8::1"])
    pem, superseded = ca.sign(host.tls_csr.read_bytes(), "party-0", "party")
    cert = x509.load_pem_x509_certificate(pem)
    assert cert_principal(cert) == "party-0" and superseded == []
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == ["party-0.principal.iomt.invalid", "p0.example"]
    assert cert_names(cert) == ["p0.example", "10.0.0.5", "2001:db8::1"]  # the host's names only
    assert alt.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"),
                                                       ipaddress.ip_address("2001:db8::1")]
    install_cert(host.dir, pem, ca.cert_path.read_bytes())
    assert Signer.from_file(host.token_key).principal == "party-0"  # the token key, in Signer's format


def test_the_ca_refuses_a_request_for_another_id_or_role(ca, tmp_path):
    host = init_host(tmp_path / "p0", "party-0", "party")
    with pytest.raises(PkiError, match="not 'party-1'"):
        ca.sign(host.tls_csr.read_bytes(), "party-1", "party")
    ca.sign(host.tls_csr.read_bytes(), "party-0", "party")
    with pytest.raises(PkiError, match="issued as party"):
        ca.sign(host.tls_csr.read_bytes(), "party-0", "coordinator")
    with pytest.raises(PkiError, match="not a PEM certificate request"):
        ca.sign(b"junk", "party-0", "party")
    greedy = init_host(tmp_path / "p1", "party-1", "party", ["p1.example", "p0.example"])
    ca.sign(init_host(tmp_path / "p0b", "party-0", "party", ["p0.example"]).tls_csr.read_bytes(), "party-0", "party")
    with pytest.raises(PkiError, match="p0.example already names 'party-0'"):  # party 1 asks for party 0's name
        ca.sign(greedy.tls_csr.read_bytes(), "party-1", "party")
    with pytest.raises(PkiError, match="neither a DNS name nor an IP"):
        init_host(tmp_path / "p9", "party-9", "party", ["bad name"])


def test_install_refuses_a_certificate_for_another_key_or_from_another_ca(ca, tmp_path):
    mine, theirs = init_host(tmp_path / "a", "h1", "hospital"), init_host(tmp_path / "b", "h2", "hospital")
    theirs_pem, _ = ca.sign(theirs.tls_csr.read_bytes(), "h2", "hospital")
    with pytest.raises(PkiError, match="not for this host's TLS key"):
        install_cert(mine.dir, theirs_pem, ca.cert_path.read_bytes())
    other = CertificateAuthority.init(tmp_path / "other-ca")
    foreign, _ = other.sign(mine.tls_csr.read_bytes(), "h1", "hospital")
    with pytest.raises(PkiError, match="not signed by this CA"):
        install_cert(mine.dir, foreign, ca.cert_path.read_bytes())
    assert not mine.tls_cert.exists()


def test_reissue_supersedes_and_revoke_lists_the_serials_in_the_crl(ca, tmp_path):
    host = init_host(tmp_path / "h", "h1", "hospital")
    first = x509.load_pem_x509_certificate(ca.sign(host.tls_csr.read_bytes(), "h1", "hospital")[0])
    host.tls_key.chmod(0o640)  # as deploy/README.md has it: readable by the service's group
    init_host(host.dir, "h1", "hospital", new_tls_key=True)
    pem, superseded = ca.sign(host.tls_csr.read_bytes(), "h1", "hospital")
    assert superseded == [format(first.serial_number, "x")]
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())
    assert {r.serial_number for r in crl} == {first.serial_number}
    install_cert(host.dir, pem, ca.cert_path.read_bytes())  # the rotated key replaces tls.key
    assert not host.tls_key_next.exists() and host.tls_key.stat().st_mode & 0o777 == 0o640
    second = x509.load_pem_x509_certificate(pem)
    assert ca.revoke("h1") == [format(second.serial_number, "x")]
    assert {r.serial_number for r in x509.load_pem_x509_crl(ca.crl_path.read_bytes())} == \
        {first.serial_number, second.serial_number}
    with pytest.raises(PkiError, match="issued nothing"):
        ca.revoke("h9")
    with pytest.raises(PkiError, match="exists"):
        CertificateAuthority.init(ca.dir)  # a CA is made once and kept


def test_register_adds_and_replaces_a_token_key(tmp_path):
    registry = tmp_path / "registry.json"
    a, b = init_host(tmp_path / "a", "h1", "hospital"), init_host(tmp_path / "b", "h1", "hospital")
    assert register(registry, "h1", "hospital", a.token_pub.read_bytes())
    declare_max_samples(registry, "h1", 50)
    assert not register(registry, "h1", "hospital", b.token_pub.read_bytes())  # a new key: replaced
    token = Signer.from_file(b.token_key).token("party-0")
    reg = Registry(registry)
    assert reg.verify(token, "party-0", ("hospital",)).sub == "h1" and reg.max_samples("h1") == 50
    with pytest.raises(PkiError, match="registered as hospital"):
        register(registry, "h1", "party", a.token_pub.read_bytes())
    with pytest.raises(PkiError, match="not a PEM public key"):
        register(registry, "h2", "hospital", a.tls_csr.read_bytes())
    from cryptography.hazmat.primitives import serialization
    ec_pub = x509.load_pem_x509_csr(a.tls_csr.read_bytes()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(PkiError, match="Ed25519"):  # the TLS key's public part is not a token key
        register(registry, "h2", "hospital", ec_pub)
    assert "private" not in json.dumps(json.loads(registry.read_text())).lower()
    assert cert_names(x509.load_pem_x509_csr(a.tls_csr.read_bytes())) == []
