"""The federation's certificates: a key per service made on its own host, a CA kept by the operator.

A host runs :func:`init_host` (`iomt keys init`): it writes the principal's Ed25519 token key
(``token.json``) and a TLS key (``tls.key``), both mode 0600, and the public parts for the
operator: ``token.pub`` and a certificate request ``tls.csr`` whose subject is the principal
id and whose SAN lists the host's DNS names and IP addresses. Private keys never leave the
host. The operator's :class:`CertificateAuthority` (`iomt ca`) signs one certificate per
service, binding the principal id (CN and the URI SAN ``urn:iomt:principal:<id>``, read back
by :func:`cert_principal`); it keeps its key, an index of what it issued and a CRL, so that
certificates can be reissued (a new CSR for the same id supersedes and revokes the old
certificate), rotated and revoked. Every certificate also names its principal as a DNS name
(:func:`protocols.tls_client.principal_host`) to which clients pin each URL; the clients' TLS
side is :mod:`protocols.tls_client`.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.auth import ROLES, check_principal_id
from protocols.tls_client import PRINCIPAL_HOST, principal_host

#: The URI SAN that names a certificate's principal: ``urn:iomt:principal:<id>``.
PRINCIPAL_URI = "urn:iomt:principal:"
#: Roles a certificate may be issued for: the token roles, ``operator`` (a person's
#: browser or script reaching the coordinator's page) and ``service`` (a TLS-only service such as the
#: MQTT broker); those two have no token key.
CERT_ROLES = (*ROLES, "operator", "service")
#: File names in a host's key folder (`iomt keys init --dir`).
TOKEN_KEY, TOKEN_PUB, TLS_KEY, TLS_CSR, TLS_CERT, CA_CERT, CRL = (
    "token.json", "token.pub", "tls.key", "tls.csr", "tls.pem", "ca.pem", "crl.pem")
#: A fresh TLS key waits here until `iomt keys install` receives its certificate (rotation).
TLS_KEY_NEXT = "tls.key.next"
DEFAULT_DAYS = 365
CRL_DAYS = 365


class PkiError(ValueError):
    """A request the CA or a host refuses (bad CSR, mismatching id, missing CA, key/cert mismatch)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only (created 0600, never world-readable in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def san_entries(names: list[str] | tuple[str, ...]) -> list[x509.GeneralName]:
    """DNS names and IP addresses (v4 or v6) as SAN entries."""
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not name or any(c.isspace() or c in "/:@" for c in name):
                raise PkiError(f"{name!r} is neither a DNS name nor an IP address") from None
            out.append(x509.DNSName(name))
    return out


# ---------------------------------------------------------------------------------------------
# the host's side
@dataclass(frozen=True)
class HostFiles:
    """The files of one host's key folder (`iomt keys init --dir`)."""

    dir: Path

    token_key = property(lambda self: self.dir / TOKEN_KEY)
    token_pub = property(lambda self: self.dir / TOKEN_PUB)
    tls_key = property(lambda self: self.dir / TLS_KEY)
    tls_key_next = property(lambda self: self.dir / TLS_KEY_NEXT)
    tls_csr = property(lambda self: self.dir / TLS_CSR)
    tls_cert = property(lambda self: self.dir / TLS_CERT)
    ca = property(lambda self: self.dir / CA_CERT)
    crl = property(lambda self: self.dir / CRL)


def _csr(key: ec.EllipticCurvePrivateKey, principal: str, names: list[str]) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, principal)]))
    alt = [x509.UniformResourceIdentifier(PRINCIPAL_URI + principal), *san_entries(names)]
    return builder.add_extension(x509.SubjectAlternativeName(alt), critical=False).sign(key, hashes.SHA256())


def init_host(folder: str | Path, principal: str, role: str, names: list[str] | tuple[str, ...] = (),
              new_tls_key: bool = False, token: bool = True) -> HostFiles:
    """Make this host's keys in ``folder`` (created 0700): what `iomt keys init` does.

    Writes ``token.json`` (the Ed25519 token key, :class:`protocols.auth.Signer`'s format) and
    ``tls.key`` (ECDSA P-256) mode 0600 unless they exist, then ``token.pub`` and ``tls.csr``
    (public, for the operator). ``new_tls_key`` (rotation) makes a fresh TLS key as
    ``tls.key.next`` with its CSR; :func:`install_cert` puts it in place with its certificate.
    Without ``names``, the names of the previous request are kept. ``token=False``: TLS only.
    """
    check_principal_id(principal)
    if role not in CERT_ROLES:
        raise PkiError(f"unknown role {role!r} (one of {', '.join(CERT_ROLES)})")
    files = HostFiles(Path(folder))
    files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if token and role in ROLES:
        if files.token_key.exists():
            data = json.loads(files.token_key.read_text())
            if data.get("id") != principal or data.get("role") != role:
                raise PkiError(f"{files.token_key} belongs to {data.get('id')!r} ({data.get('role')}), "
                               f"not {principal!r} ({role})")
            token = serialization.load_pem_private_key(data["private_key"].encode(), password=None)
        else:
            token = Ed25519PrivateKey.generate()
            write_private(files.token_key, json.dumps(
                {"id": principal, "role": role, "private_key": _pem_private(token).decode()}).encode())
        files.token_pub.write_bytes(_pem_public(token.public_key()))
    names = list(names)
    if not names and files.tls_csr.exists():  # a rotation keeps the names of the last request
        names = cert_names(x509.load_pem_x509_csr(files.tls_csr.read_bytes()))
    if new_tls_key or not files.tls_key.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        write_private(files.tls_key_next if files.tls_key.exists() else files.tls_key, _pem_private(key))
    else:
        key = _load_key(files.tls_key)
    files.tls_csr.write_bytes(_csr(key, principal, names).public_bytes(serialization.Encoding.PEM))
    return files


def _load_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def install_cert(folder: str | Path, cert_pem: bytes, ca_pem: bytes | None = None,
                 crl_pem: bytes | None = None) -> HostFiles:
    """Put the certificate the operator signed (and ``ca.pem``, ``crl.pem``) into a host's folder.

    The certificate must match ``tls.key.next`` (a rotation: that key then replaces
    ``tls.key``) or ``tls.key``, and chain to the CA; otherwise :class:`PkiError`.
    """
    files = HostFiles(Path(folder))
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_pem = ca_pem if ca_pem is not None else (files.ca.read_bytes() if files.ca.exists() else None)
    if ca_pem is None:
        raise PkiError(f"no CA certificate: give the federation's ca.pem (none in {files.dir})")
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as err:
        raise PkiError(f"the certificate was not signed by this CA ({ca.subject.rfc4514_string()})") from err
    mine = _pem_public(cert.public_key())
    for path in (files.tls_key_next, files.tls_key):
        if path.exists() and _pem_public(_load_key(path).public_key()) == mine:
            break
    else:
        raise PkiError(f"the certificate is not for this host's TLS key ({files.dir}): sign this host's tls.csr")
    if path == files.tls_key_next:  # the new key gets the old one's group and (at most 0640) mode:
        old = files.tls_key.stat() if files.tls_key.exists() else None  # the service's group may read it
        if old is not None:
            try:
                os.chown(files.tls_key_next, -1, old.st_gid)
            except PermissionError:
                pass
            os.chmod(files.tls_key_next, old.st_mode & 0o640)
        os.replace(files.tls_key_next, files.tls_key)
    _atomic(files.tls_cert, cert_pem)
    _atomic(files.ca, ca_pem)
    if crl_pem is not None:
        _atomic(files.crl, crl_pem)
    return files


# ---------------------------------------------------------------------------------------------
# reading certificates
def cert_principal(cert: x509.Certificate) -> str | None:
    """The principal id a federation certificate names (its ``urn:iomt:principal:`` URI SAN)."""
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ids = [u[len(PRINCIPAL_URI):] for u in alt.get_values_for_type(x509.UniformResourceIdentifier)
           if u.startswith(PRINCIPAL_URI)]
    return ids[0] if len(ids) == 1 else None


def cert_names(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """The DNS names and IP addresses in a certificate's (or request's) SAN."""
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*(n for n in alt.get_values_for_type(x509.DNSName) if not n.endswith(PRINCIPAL_HOST)),
            *(str(a) for a in alt.get_values_for_type(x509.IPAddress))]


# ---------------------------------------------------------------------------------------------
# the operator's side
class CertificateAuthority:
    """The federation's CA in a folder: ``ca.key`` (0600), ``ca.pem``, ``issued.json``, ``crl.pem``.

    ``issued.json`` lists every certificate issued: ``{serial_hex: {"id", "role", "names",
    "not_after", "revoked": null | {"at", "reason"}}}``; :meth:`write_crl` signs the revoked ones.
    """

    def __init__(self, folder: str | Path) -> None:
        self.dir = Path(folder)
        self.key_path, self.cert_path = self.dir / "ca.key", self.dir / CA_CERT
        self.index_path, self.crl_path = self.dir / "issued.json", self.dir / CRL
        if not (self.key_path.exists() and self.cert_path.exists()):
            raise PkiError(f"no CA in {self.dir}: run `iomt ca init --dir {self.dir}` first")
        self._key = _load_key(self.key_path)
        self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    @classmethod
    def init(cls, folder: str | Path, name: str = "iomt federation CA", days: int = 3650) -> CertificateAuthority:
        """Create a CA in ``folder``; refuses to replace one (its certificates would all fail)."""
        folder = Path(folder)
        if (folder / "ca.key").exists():
            raise PkiError(f"{folder / 'ca.key'} exists; a CA is made once and kept")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA384()))
        write_private(folder / "ca.key", _pem_private(key))
        (folder / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / "issued.json").write_text("{}")
        ca = cls(folder)
        ca.write_crl()
        return ca

    def index(self) -> dict[str, dict]:
        return json.loads(self.index_path.read_text()) if self.index_path.exists() else {}

    def _save(self, index: dict[str, dict]) -> None:
        _atomic(self.index_path, json.dumps(index, indent=1).encode())

    def sign(self, csr_pem: bytes, principal: str, role: str, days: int = DEFAULT_DAYS,
             names: list[str] | None = None, keep_previous: bool = False,
             share_names: bool = False) -> tuple[bytes, list[str]]:
        """Sign a host's request: one certificate for ``principal``; returns (PEM, superseded serials).

        The request's subject must name ``principal``; its SAN's DNS names and IP addresses are
        kept unless ``names`` replaces them. The certificate binds the id (CN and URI SAN),
        serves as server and client certificate, and supersedes (revokes, reason
        ``superseded``) the id's earlier certificates unless ``keep_previous``. A name that a
        valid certificate of another principal holds is refused unless ``share_names`` (services
        on one host): otherwise party 0's operator could ask for party 1's host name and serve
        in its place.
        """
        check_principal_id(principal)
        if role not in CERT_ROLES:
            raise PkiError(f"unknown role {role!r} (one of {', '.join(CERT_ROLES)})")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as err:
            raise PkiError(f"not a PEM certificate request: {err}") from err
        if not csr.is_signature_valid:
            raise PkiError("the request's signature does not verify")
        cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [principal]:
            raise PkiError(f"the request is for {cns[0] if cns else 'nobody'!r}, not {principal!r}")
        pub = csr.public_key()
        if not (isinstance(pub, ec.EllipticCurvePublicKey) or (isinstance(pub, rsa.RSAPublicKey) and pub.key_size >= 2048)):
            raise PkiError("the request's key must be ECDSA or RSA of at least 2048 bits")
        names = list(names) if names is not None else cert_names(csr)
        index = self.index()
        for entry in index.values():
            if entry["id"] == principal and entry["role"] != role:
                raise PkiError(f"{principal!r} was issued as {entry['role']}, not {role}")
            taken = set(names) & set(entry["names"])
            if taken and entry["id"] != principal and entry["revoked"] is None and not share_names:
                raise PkiError(f"{', '.join(sorted(taken))} already names {entry['id']!r}; a name belongs to one "
                               "service (revoke that certificate first, or --share-names for services on one host)")
        now = _now()
        alt = [x509.UniformResourceIdentifier(PRINCIPAL_URI + principal), x509.DNSName(principal_host(principal)),
               *san_entries(names)]
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, principal),
                                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
                .issuer_name(self.cert.subject).public_key(csr.public_key()).serial_number(serial)
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                             crl_sign=False, content_commitment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                               critical=False)
                .sign(self._key, hashes.SHA384()))
        superseded = []
        if not keep_previous:
            for s, entry in index.items():
                if entry["id"] == principal and entry["revoked"] is None:
                    entry["revoked"] = {"at": now.isoformat(), "reason": "superseded"}
                    superseded.append(s)
        index[format(serial, "x")] = {"id": principal, "role": role, "names": names,
                                      "not_after": (now + dt.timedelta(days=days)).isoformat(), "revoked": None}
        self._save(index)
        if superseded:
            self.write_crl()
        return cert.public_bytes(serialization.Encoding.PEM), superseded

    def revoke(self, principal: str, serial: str | None = None, reason: str = "key_compromise") -> list[str]:
        """Revoke ``principal``'s certificates (or only ``serial``, hex); rewrites the CRL.

        Returns the serials newly revoked; :class:`PkiError` when nothing matched.
        """
        index, now, done = self.index(), _now().isoformat(), []
        for s, entry in index.items():
            if entry["id"] == principal and (serial is None or int(s, 16) == int(serial, 16)):
                if entry["revoked"] is None:
                    entry["revoked"] = {"at": now, "reason": reason}
                    done.append(s)
        if not done and not any(e["id"] == principal for e in index.values()):
            raise PkiError(f"this CA issued nothing to {principal!r}" + (f" with serial {serial}" if serial else ""))
        self._save(index)
        self.write_crl()
        return done

    def write_crl(self, days: int = CRL_DAYS) -> Path:
        """(Re)sign ``crl.pem``: every revoked serial; valid ``days`` (re-run before it lapses)."""
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=days)))
        for s, entry in self.index().items():
            if entry["revoked"] is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(s, 16))
                    .revocation_date(dt.datetime.fromisoformat(entry["revoked"]["at"])).build())
        crl = builder.sign(self._key, hashes.SHA384())
        _atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path


def load_token_public_key(pem: bytes) -> str:
    """``pem`` if it is an Ed25519 public key (a host's ``token.pub``), else :class:`PkiError`."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as err:
        raise PkiError(f"not a PEM public key: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise PkiError("the token key must be Ed25519 (a host's token.pub)")
    return pem.decode()


def register(registry: str | Path, principal: str, role: str, public_key_pem: bytes) -> bool:
    """Add (or replace) ``principal``'s public token key in ``registry.json`` (created if absent).

    Returns True when the principal was new. Replacing a key keeps the entry's other fields
    (``max_samples``) and does not lift a revocation.
    """
    check_principal_id(principal)
    if role not in ROLES:
        raise PkiError(f"role {role!r} has no tokens (one of {', '.join(ROLES)})")
    pub = load_token_public_key(public_key_pem)
    path = Path(registry)
    data = json.loads(path.read_text()) if path.exists() else {"principals": {}, "revoked": []}
    entry = data.setdefault("principals", {}).get(principal)
    if entry is not None and entry.get("role") != role:
        raise PkiError(f"{principal!r} is registered as {entry.get('role')}, not {role}")
    data["principals"][principal] = {**(entry or {}), "role": role, "public_key": pub}
    data.setdefault("revoked", [])
    _atomic(path, json.dumps(data, indent=1).encode())
    return entry is None


def issue_local(root: str | Path, principals: list[tuple[str, str]], names: tuple[str, ...] = ("127.0.0.1", "localhost"),
                days: int = DEFAULT_DAYS) -> tuple[CertificateAuthority, dict[str, HostFiles]]:
    """One-machine convenience (demo, tests): a CA in ``root/ca`` and, per (id, role), a TLS
    folder ``root/hosts/<id>`` made by the same steps as on separate hosts (key and request
    there, signed by the CA, certificate installed): each service its own key and certificate.
    Token keys and the registry are :func:`protocols.auth.make_credentials`'s."""
    root = Path(root)
    ca = CertificateAuthority(root / "ca") if (root / "ca" / "ca.key").exists() else CertificateAuthority.init(root / "ca")
    hosts = {}
    for pid, role in principals:
        files = init_host(root / "hosts" / pid, pid, role, names, token=False)
        cert, _ = ca.sign(files.tls_csr.read_bytes(), pid, role, days=days, share_names=True)  # one host
        hosts[pid] = install_cert(files.dir, cert, ca.cert_path.read_bytes(), ca.crl_path.read_bytes())
    return ca, hosts
