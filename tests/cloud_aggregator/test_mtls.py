"""A key per service, made on its host, and mutual TLS on every link, with real processes.

Each host (two parties, the coordinator, two hospitals) makes its own keys in its own folder
with `iomt keys init`; only ``token.pub`` and ``tls.csr`` travel to the operator, whose CA
(`iomt ca`) signs one certificate per service and registers the token keys; the host installs
its certificate (`iomt keys install`). Party 0 is reached by an IP address SAN (127.0.0.2),
party 1 by another (127.0.0.3), the coordinator by a DNS name (``localhost``).
"""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import threading

import httpx
import pytest

from edge_server.federation.client import FederatedClient
from iomt.cli import main as iomt
from iomt.local_cloud import toy_state
from iomt.supervisor import Supervisor, free_port, iomt_argv, wait_port
from protocols.auth import Signer

pytestmark = pytest.mark.integration

HOSTS = {"party-0": ("party", "127.0.0.2"), "party-1": ("party", "127.0.0.3"),
         "coordinator": ("coordinator", "localhost"), "h1": ("hospital", None), "h2": ("hospital", None)}


def _iomt(*argv: str) -> None:
    assert iomt([str(a) for a in argv]) == 0, argv


def _enrol(root, pid: str, role: str, name: str | None) -> None:
    """On the host: keys and request; to the operator: the public parts only; back: the certificate."""
    host, inbox = root / "hosts" / pid, root / "operator" / "inbox" / pid
    _iomt("keys", "init", "--id", pid, "--role", role, "--dir", host, *(["--tls-name", name] if name else []))
    inbox.mkdir(parents=True)
    for public in ("token.pub", "tls.csr"):
        shutil.copy(host / public, inbox / public)
    ca = root / "operator" / "ca"
    _iomt("ca", "sign", "--dir", ca, "--csr", inbox / "tls.csr", "--id", pid, "--role", role,
          "--out", inbox / "tls.pem")
    _iomt("ca", "register", "--registry", root / "operator" / "registry.json", "--id", pid, "--role", role,
          "--public-key", inbox / "token.pub")
    _iomt("keys", "install", "--dir", host, "--cert", inbox / "tls.pem", "--ca", ca / "ca.pem", "--crl", ca / "crl.pem")


def _tls_flags(root, pid: str) -> list[str]:
    host = root / "hosts" / pid
    return ["--tls-cert", host / "tls.pem", "--tls-key", host / "tls.key", "--tls-ca", host / "ca.pem",
            "--tls-crl", host / "crl.pem"]


def _pem_body(text: str) -> str:
    """The base64 of the (first) PEM block in ``text`` (a key file, or a JSON one holding a PEM)."""
    pem = json.loads(text)["private_key"] if text.startswith("{") else text
    return "".join(pem.split("-----")[2].split())


class Federation:
    def __init__(self, root) -> None:
        self.root = root
        self.party_urls = [f"https://127.0.0.2:{free_port('127.0.0.2')}", f"https://127.0.0.3:{free_port('127.0.0.3')}"]
        self.coord_url = f"https://localhost:{free_port()}"

    def host(self, pid: str):
        return self.root / "hosts" / pid

    def verify(self, pid: str | None, ca=None) -> ssl.SSLContext:
        """A client context presenting ``pid``'s certificate (None: none)."""
        context = ssl.create_default_context(cafile=str(ca or self.host("h1") / "ca.pem"))
        if pid is not None:
            context.load_cert_chain(self.host(pid) / "tls.pem", self.host(pid) / "tls.key")
        return context

    def signer(self, pid: str) -> Signer:
        return Signer.from_file(self.host(pid) / "token.json")

    def client(self, pid: str) -> FederatedClient:
        h = self.host(pid)
        return FederatedClient(self.signer(pid), self.coord_url, ca=h / "ca.pem", cert=h / "tls.pem",
                               key=h / "tls.key", crl=h / "crl.pem")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtls")
    _iomt("ca", "init", "--dir", root / "operator" / "ca")
    for pid, (role, name) in HOSTS.items():
        _enrol(root, pid, role, name)
    f = Federation(root)
    registry = root / "operator" / "registry.json"
    (root / "model.json").write_text(json.dumps({"arch": "toy", "config": {}, "init_seed": 1,
                                                 "spec": [[k, list(v.shape)] for k, v in toy_state(0).items()]}))
    with Supervisor(root / "logs", one_thread=True) as sup:
        procs = {}
        for i, url in enumerate(f.party_urls):
            host, port = url.removeprefix("https://").split(":")
            procs[f"party-{i}"] = sup.start(f"party-{i}", iomt_argv(
                "cloud", "party", "--index", str(i), "--parties", "2", "--data-dir", str(root / f"data-{i}"),
                "--listen", f"{host}:{port}", "--registry", str(registry), "--coordinator", f.coord_url,
                "--key-file", str(f.host(f"party-{i}") / "token.json"), *map(str, _tls_flags(root, f"party-{i}"))))
        coord_port = f.coord_url.rsplit(":", 1)[1]
        procs["coordinator"] = sup.start("coordinator", iomt_argv(
            "cloud", "coordinator", "--data-dir", str(root / "coord"), "--listen", f"127.0.0.1:{coord_port}",
            "--registry", str(registry), "--key-file", str(f.host("coordinator") / "token.json"),
            "--model", str(root / "model.json"), "--min-hospitals", "2", "--round-timeout", "600",
            *[a for u in f.party_urls for a in ("--party", u)], *map(str, _tls_flags(root, "coordinator"))))
        for i, url in enumerate(f.party_urls):
            host, port = url.removeprefix("https://").split(":")
            wait_port(int(port), host=host, proc=procs[f"party-{i}"].proc, name=f"party-{i}")
        wait_port(int(coord_port), proc=procs["coordinator"].proc, name="coordinator")
        f.sup = sup
        yield f


def test_each_host_has_its_own_key_and_no_private_key_reaches_the_operator(fed):
    from cryptography import x509

    from protocols.pki import cert_names, cert_principal

    certs = {pid: x509.load_pem_x509_certificate((fed.host(pid) / "tls.pem").read_bytes()) for pid in HOSTS}
    assert {pid: cert_principal(c) for pid, c in certs.items()} == {pid: pid for pid in HOSTS}
    assert len({c.public_key().public_numbers() for c in certs.values()}) == len(HOSTS)  # one key each
    assert cert_names(certs["party-0"]) == ["127.0.0.2"] and cert_names(certs["coordinator"]) == ["localhost"]
    for pid in HOSTS:
        for name in ("token.json", "tls.key"):
            assert (fed.host(pid) / name).stat().st_mode & 0o777 == 0o600
    private = [body for pid in HOSTS for name in ("token.json", "tls.key")
               for body in [_pem_body((fed.host(pid) / name).read_text())]]
    for path in (fed.root / "operator").rglob("*"):
        if path.is_file() and path.name != "ca.key":
            data = path.read_text()
            assert "PRIVATE KEY" not in data and not any(body in data for body in private), path
    assert (fed.root / "operator" / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600


def test_round_over_mutual_tls_on_every_link(fed):
    clients = {h: fed.client(h) for h in ("h1", "h2")}
    try:
        for c in clients.values():
            c.register()  # hospital -> coordinator; round 1 opens once both are in
        status = None
        for _ in range(600):
            status = clients["h1"].status().current
            if status is not None and status.state == "open":
                break
            fed.sup.check()
        for h, c in clients.items():  # hospital -> each party (party -> coordinator for the round's config)
            c.upload(status.config, toy_state(int(h[1:])), 10)
        for _ in range(1200):  # coordinator -> parties: receipts, then aggregation
            done = clients["h1"].round_status(1)
            if done.state in ("done", "failed"):
                break
            fed.sup.check()
        assert done.state == "done" and done.participants == ["h1", "h2"]
    finally:
        for c in clients.values():
            c.close()


@pytest.mark.parametrize("cert, token, target", [
    ("party-0", "coordinator", 1),   # party 0 poses as the coordinator to party 1
    ("party-0", "party-1", 1),       # ... or as party 1
    ("h1", "h2", 0),                 # one hospital as another
    ("coordinator", "h1", 0),        # the coordinator as a hospital
])
def test_a_certificate_cannot_carry_another_principals_token(fed, cert, token, target):
    url, audience = fed.party_urls[target], f"party-{target}"
    path = "/rounds/1/receipts" if token != "h1" and token != "h2" else "/global/latest/meta"
    with httpx.Client(verify=fed.verify(cert)) as http:
        resp = http.get(f"{url}{path}", headers=fed.signer(token).headers(audience))
    assert resp.status_code == 403 and resp.json()["error"] == "forbidden", resp.text
    assert "cert_mismatch" in resp.json()["detail"] and repr(cert) in resp.json()["detail"]
    with httpx.Client(verify=fed.verify(f"party-{1 - target}")) as http:  # counted at the party
        metrics = http.get(f"{url}/metrics", headers=fed.signer(f"party-{1 - target}").headers(audience)).json()
    assert metrics["cert_mismatch"] >= 1 and metrics["auth_rejected_403"] >= 1
    assert "cert_mismatch" in (fed.root / "logs" / f"party-{target}.log").read_text()


def test_matching_certificate_and_token_pass(fed):
    with httpx.Client(verify=fed.verify("coordinator")) as http:
        resp = http.get(f"{fed.party_urls[1]}/rounds/1/receipts", headers=fed.signer("coordinator").headers("party-1"))
    assert resp.status_code == 200, resp.text


def test_no_certificate_or_a_foreign_one_fails_the_handshake(fed, tmp_path):
    from protocols.pki import issue_local

    _, foreign = issue_local(tmp_path / "other", [("party-0", "party")], ("127.0.0.2",))
    other = fed.verify(None)
    other.load_cert_chain(foreign["party-0"].tls_cert, foreign["party-0"].tls_key)
    for verify in (fed.verify(None), other):
        with pytest.raises(httpx.TransportError), httpx.Client(verify=verify) as http:
            http.get(f"{fed.party_urls[1]}/health").raise_for_status()


def _rogue(cert_dir, addr: str) -> int:
    """A one-request HTTPS server at ``addr`` with the certificate and key in ``cert_dir``; its port."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_dir / "tls.pem", cert_dir / "tls.key")
    sock = socket.create_server((addr, 0))

    def accept():
        conn, _ = sock.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)  # the request
                tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        except (ssl.SSLError, OSError):
            pass
        finally:
            sock.close()
    threading.Thread(target=accept, daemon=True).start()
    return sock.getsockname()[1]


def _get(verify, url: str, **kw) -> str:
    try:
        with httpx.Client(verify=verify) as http:
            return http.get(url, **kw).text
    except httpx.ConnectError as err:
        return str(err)


def test_a_party_certificate_cannot_serve_as_the_other_party(fed):
    """Party 0's operator serves with party 0's certificate at party 1's address: clients refuse it,
    by the name (party 1's IP address is not in party 0's certificate) and, even where names are
    shared (every service on one host), by the principal the client pins for that URL."""
    from protocols.tls_client import pin_extensions

    p0 = fed.host("party-0")
    at_p1 = _get(fed.verify("h1"), f"https://127.0.0.3:{_rogue(p0, '127.0.0.3')}/")
    assert "127.0.0.3" in at_p1 and "certificate verify failed" in at_p1, at_p1
    url = f"https://127.0.0.2:{_rogue(p0, '127.0.0.2')}"  # its own address: the name passes ...
    as_p1 = _get(fed.verify("h1"), f"{url}/", extensions=pin_extensions(url, "party-1"))
    assert "certificate verify failed" in as_p1 and "party-1.principal.iomt.invalid" in as_p1, as_p1
    url = f"https://127.0.0.2:{_rogue(p0, '127.0.0.2')}"  # ... and as party 0, it is party 0 (control)
    assert _get(fed.verify("h1"), f"{url}/", extensions=pin_extensions(url, "party-0")) == "ok"


def test_a_hospital_refuses_a_coordinator_that_lists_one_party_twice(tmp_path):
    """Both shares to one party would hand it the update: registration fails instead."""
    from edge_server.federation.client import FederationError
    from protocols.aggregation_messages import FederationStatus
    from protocols.auth import make_credentials

    make_credentials(tmp_path, ["h1"], 2)
    status = FederationStatus(current=None, latest_version=None, rounds_done=0, rounds_planned=1, finished=False,
                              parties=["https://p0.example:8800", "https://p0.example:8800/"])
    client = FederatedClient(Signer.from_file(tmp_path / "keys" / "h1.json"), "https://coord.example:8790")
    client._pins.inner = httpx.MockTransport(lambda request: httpx.Response(200, content=status.model_dump_json()))
    with pytest.raises(FederationError, match="lists a party twice"):
        client.register()
    assert client.party_urls == []


def test_rotation_new_certificate_works_and_revoked_old_one_is_refused(fed, tmp_path):
    host, ca = fed.host("h2"), fed.root / "operator" / "ca"
    old = tmp_path / "old"
    old.mkdir()
    for name in ("tls.pem", "tls.key"):
        shutil.copy(host / name, old / name)
    _iomt("keys", "init", "--id", "h2", "--role", "hospital", "--dir", host, "--new-tls-key")
    assert (host / "tls.key.next").exists()
    _iomt("ca", "sign", "--dir", ca, "--csr", host / "tls.csr", "--id", "h2", "--role", "hospital",
          "--out", tmp_path / "h2.pem")  # supersedes (revokes) the old certificate
    _iomt("keys", "install", "--dir", host, "--cert", tmp_path / "h2.pem", "--crl", ca / "crl.pem")
    assert not (host / "tls.key.next").exists() and (host / "tls.key").read_bytes() != (old / "tls.key").read_bytes()
    shutil.copy(ca / "crl.pem", fed.host("party-0") / "crl.pem")  # the operator distributes the CRL

    def ask(cert_dir) -> httpx.Response:
        context = fed.verify(None)
        context.load_cert_chain(cert_dir / "tls.pem", cert_dir / "tls.key")
        with httpx.Client(verify=context) as http:
            return http.get(f"{fed.party_urls[0]}/global/latest/meta", headers=fed.signer("h2").headers("party-0"))

    assert ask(host).status_code == 200  # the new certificate (the round test left a global model)
    refused = ask(old)
    assert refused.status_code == 403 and "cert_revoked" in refused.json()["detail"]
    _iomt("ca", "revoke", "--dir", ca, "--id", "h2")
    shutil.copy(ca / "crl.pem", fed.host("party-0") / "crl.pem")
    assert ask(host).status_code == 403


def test_a_service_without_tls_material_refuses_to_start_unless_insecure_http(tmp_path):
    """Today's services served plain HTTP silently when --tls-cert was missing."""
    from protocols.auth import make_credentials

    registry = make_credentials(tmp_path / "creds", ["h1"], 2)
    with Supervisor(tmp_path / "logs", one_thread=True) as sup:
        port = free_port()
        argv = ["cloud", "party", "--index", "0", "--parties", "2", "--data-dir", str(tmp_path / "p0"),
                "--registry", str(registry), "--listen", f"127.0.0.1:{port}"]
        child = sup.start("plain", iomt_argv(*argv), daemon=False)
        while child.proc.poll() is None:  # today's party starts listening; the fixed one exits 2
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                pass
        assert child.proc.poll() is not None, "it serves plain HTTP without TLS material or --insecure-http"
        assert child.proc.returncode == 2
        log = (tmp_path / "logs" / "plain.log").read_text()
        assert "no TLS material" in log and "--insecure-http" in log
        child = sup.start("insecure", iomt_argv(*argv, "--insecure-http"))
        wait_port(port, proc=child.proc, name="party")
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        assert "WARNING" in (tmp_path / "logs" / "insecure.log").read_text() and \
            "PLAIN HTTP" in (tmp_path / "logs" / "insecure.log").read_text()
