"""`iomt broker --hospital H --passwords FILE` with a TLS listener, against real Mosquitto: a
device account can publish only under its own id, reads nothing, cannot take another account's
client id or the edge's session; anonymous clients and an account-less broker are refused."""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import pwd
import shutil
import signal
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import device_agent.agent as agent_mod
from device_agent.agent import DeviceAgent
from device_agent.broker_cli import acl_text, find_mosquitto, mosquitto_config
from device_agent.settings import AgentSettings
from protocols.auth import make_tls
from protocols.messages import DeviceRegistration, SignalFrame, to_wire
from tests.edge_server.harness import spawn_edge, wait_status
from tests.device_agent.secure_broker import mosquitto_passwd_path
from iomt.supervisor import free_port, run_iomt, spawn_iomt, stop, wait_port

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(find_mosquitto() is None or mosquitto_passwd_path() is None,
                                 reason="mosquitto and mosquitto_passwd are not installed")]

USERS = {"w-a": "secret-a", "w-b": "secret-b", "edge-h1": "secret-edge"}
B_FRAME = "iomt/h1/wearable/w-b/ecg"
B_REGISTRATION = "iomt/h1/wearable/w-b/registration"
FAKE_REGISTRATION = b'{"device_id": "w-b", "patient_id": "someone else"}'
EDGE_SESSION = "iomt-edge-h1-0123456789ab"  # what a client could derive from public facts
SETTLE_S = 0.5  # after a PUBACK the broker has routed the message; a little more for the socket


@contextlib.contextmanager
def accounts_broker(log_dir: Path):
    """`iomt broker --hospital h1 --passwords F --tls-cert C --tls-key K` on a free loopback port."""
    # World-searchable: started as root, Mosquitto reads the password file as user mosquitto.
    work = Path(tempfile.mkdtemp(prefix="iomt-test-acl-"))
    work.chmod(0o755)
    passwords = work / "passwords"
    for user, password in USERS.items():
        subprocess.run([mosquitto_passwd_path(), *(["-c"] if not passwords.exists() else []), "-b",
                        str(passwords), user, password], check=True, capture_output=True)
    tls = make_tls(work / "tls")
    for secret in (passwords, tls["key"]):  # as documented: readable by the broker's group only
        secret.chmod(0o640)
        if os.geteuid() == 0:
            os.chown(secret, 0, broker_account().pw_gid)
    port = free_port()
    log = log_dir / "broker.log"
    proc = spawn_iomt("-v", "broker", "--port", str(port), "--hospital", "h1", "--passwords", str(passwords),
                      "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]), log=log)
    try:
        wait_port(port, timeout=60)
    except TimeoutError:
        stop(proc)
        raise AssertionError(log.read_text()[-3000:]) from None
    try:
        yield {"port": port, "ca": tls["ca"], "log": log, "url": f"mqtts://127.0.0.1:{port}", "proc": proc,
               "passwords": passwords}
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with accounts_broker(tmp_path_factory.mktemp("acl-broker")) as b:
        yield b


def broker_account() -> pwd.struct_passwd:
    """The user a root-started `iomt broker` drops to."""
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        return pwd.getpwnam("nobody")


class Client:
    """A paho client that records CONNACKs, disconnects and messages."""

    def __init__(self, broker, user: str | None, client_id: str, clean: bool = True, tls: bool = True) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connacks: list[str] = []
        self.disconnects = 0
        self.connected = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        if user is not None:
            self.c.username_pw_set(user, USERS[user])
        if tls:
            self.c.tls_set(ca_certs=str(broker["ca"]))
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: setattr(self, "disconnects", self.disconnects + 1)
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.c.connect("127.0.0.1", broker["port"])
        self.c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connacks.append(str(reason_code))
        if not reason_code.is_failure:
            self.connected.set()

    def wait_connack(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.connacks and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.connacks[0] if self.connacks else "no CONNACK"

    def subscribe(self, topic: str) -> None:
        assert self.connected.wait(20)
        info = threading.Event()
        self.c.on_subscribe = lambda *a: info.set()
        self.c.subscribe(topic, qos=1)
        assert info.wait(20)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.connected.wait(20)
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(20)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def clients(broker):
    made: list[Client] = []

    def make(*args, **kw) -> Client:
        made.append(Client(broker, *args, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


def _settle() -> None:
    time.sleep(SETTLE_S)


def test_a_device_publishes_its_own_topics_and_nothing_as_another(clients):
    edge = clients("edge-h1", "edge")
    edge.subscribe("iomt/h1/#")
    a = clients("w-a", "w-a")
    a.publish("iomt/h1/wearable/w-a/ecg", b"a's own frame")
    a.publish(B_FRAME, b"a posing as b")
    a.publish(B_REGISTRATION, FAKE_REGISTRATION, retain=True)
    a.publish("iomt/h2/wearable/w-a/ecg", b"a in another hospital")
    _settle()
    assert edge.messages == [("iomt/h1/wearable/w-a/ecg", b"a's own frame")]
    late = clients("edge-h1", "edge-again")  # nothing retained under b's name either
    late.subscribe("iomt/h1/#")
    _settle()
    assert (B_REGISTRATION, FAKE_REGISTRATION) not in late.messages


def test_a_device_reads_nothing(clients):
    a = clients("w-a", "w-a")
    for topic in ("iomt/#", "#", "iomt/h1/#", "iomt/h1/wearable/w-b/#", "iomt/h2/#", "iomt/h1/wearable/w-a/#"):
        a.subscribe(topic)
    b = clients("w-b", "w-b")
    b.publish(B_FRAME, b"b's frame")
    b.publish(B_REGISTRATION, b"b's registration")
    a.publish("iomt/h1/wearable/w-a/ecg", b"a's own frame")
    _settle()
    assert a.messages == []


def test_another_devices_client_id_does_not_disconnect_it(clients):
    b = clients("w-b", "h1-w-b")  # the device agent's default client id
    assert b.wait_connack() == "Success"
    a = clients("w-a", "h1-w-b")
    assert a.wait_connack() == "Success"  # connected, but as w-a
    _settle()
    assert b.disconnects == 0 and a.disconnects == 0
    edge = clients("edge-h1", "edge")
    edge.subscribe("iomt/h1/#")
    b.publish(B_FRAME, b"still here")
    _settle()
    assert (B_FRAME, b"still here") in edge.messages


def test_the_edges_session_is_its_own(clients):
    edge = clients("edge-h1", EDGE_SESSION, clean=False)
    edge.subscribe("iomt/h1/#")
    edge.close()
    b = clients("w-b", "w-b")
    for i in range(5):
        b.publish(B_FRAME, b"queued %d" % i)
    thief = clients("w-a", EDGE_SESSION, clean=False)
    assert thief.wait_connack() == "Success"
    _settle()
    thief.close()
    assert thief.messages == []
    back = clients("edge-h1", EDGE_SESSION, clean=False)
    deadline = time.monotonic() + 20
    queued = lambda: [p for t, p in back.messages if t == B_FRAME]  # noqa: E731
    while len(queued()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queued() == [b"queued %d" % i for i in range(5)]


def test_anonymous_and_wrong_password_are_refused(broker, clients):
    assert clients(None, "anon").wait_connack() == "Not authorized"
    USERS["w-x"] = "guess"
    try:
        assert clients("w-x", "w-x").wait_connack() == "Not authorized"
    finally:
        del USERS["w-x"]


def test_a_device_added_to_the_password_file_connects_after_sighup(tmp_path):
    with accounts_broker(tmp_path) as b:
        USERS["w-new"] = "secret-new"
        try:
            subprocess.run([mosquitto_passwd_path(), "-b", str(b["passwords"]), "w-new", USERS["w-new"]],
                           check=True, capture_output=True)
            b["proc"].send_signal(signal.SIGHUP)  # the process is Mosquitto itself
            deadline = time.monotonic() + 20
            while "Reloading config" not in b["log"].read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            edge = Client(b, "edge-h1", "edge")
            edge.subscribe("iomt/h1/#")
            new = Client(b, "w-new", "w-new")
            assert new.wait_connack() == "Success"
            new.publish("iomt/h1/wearable/w-new/ecg", b"hello")
            new.publish(B_FRAME, b"not b")
            _settle()
            assert edge.messages == [("iomt/h1/wearable/w-new/ecg", b"hello")]
            edge.close()
            new.close()
        finally:
            del USERS["w-new"]


def test_without_accounts_or_the_demo_flag_the_broker_does_not_start(tmp_path):
    out = run_iomt("broker", "--port", str(free_port()), check=False, timeout=60)
    assert out.returncode == 2 and "--allow-anonymous" in out.stderr and "--passwords" in out.stderr
    out = run_iomt("broker", "--port", str(free_port()), "--embedded", check=False, timeout=60)
    assert out.returncode == 2 and "no accounts" in out.stderr


def test_off_loopback_a_plain_listener_needs_its_own_flag(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("")
    out = run_iomt("broker", "--port", str(free_port()), "--host", "0.0.0.0", "--hospital", "h1",
                   "--passwords", str(pw), check=False, timeout=60)
    assert out.returncode == 2 and "--tls-cert" in out.stderr and "--allow-plain" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="Mosquitto drops privileges only when started as root")
def test_a_password_file_the_broker_user_cannot_read_is_refused(tmp_path):
    pw = tmp_path / "pw"  # pytest's tmp dirs are 0700 root
    pw.write_text("")
    pw.chmod(stat.S_IRUSR)
    out = run_iomt("broker", "--port", str(free_port()), "--hospital", "h1", "--passwords", str(pw),
                   check=False, timeout=60)
    assert out.returncode == 2 and "cannot enter" in out.stderr


def test_the_generated_config_and_acl():
    conf = mosquitto_config("0.0.0.0", 8883, None, passwords=Path("/etc/iomt/pw"), acl_file="/dev/fd/3",
                            tls=(Path("/etc/iomt/c.pem"), Path("/etc/iomt/k.pem")))
    for line in ("listener 8883 0.0.0.0", "allow_anonymous false", "use_username_as_clientid true",
                 "password_file /etc/iomt/pw", "acl_file /dev/fd/3", "certfile /etc/iomt/c.pem"):
        assert line in conf.splitlines()
    assert "allow_anonymous true" in mosquitto_config("127.0.0.1", 1883, None)
    certs = mosquitto_config("0.0.0.0", 8883, None, acl_file="/dev/fd/3", client_ca=Path("/etc/iomt/ca.pem"),
                             tls=(Path("/etc/iomt/c.pem"), Path("/etc/iomt/k.pem"))).splitlines()
    for line in ("cafile /etc/iomt/ca.pem", "require_certificate true", "use_identity_as_username true",
                 "allow_anonymous false", "use_username_as_clientid true", "acl_file /dev/fd/3"):
        assert line in certs
    assert not any(line.startswith("password_file") for line in certs)
    acl = acl_text("h1", "edge-h1").splitlines()
    assert "pattern write iomt/h1/+/%u/+" in acl
    assert acl[acl.index("user edge-h1") + 1] == "topic read iomt/h1/#"
    assert not any(line.startswith(("topic", "pattern")) and "read" in line for line in acl
                   if line != "topic read iomt/h1/#")


def test_the_edge_files_a_devices_frames_under_its_own_registration_only(tmp_path, fast_backoff):
    """The real edge (its own account, over TLS) and the real agent of w-b, with w-a first trying
    to register w-b to another patient and to publish w-b's frames (same ids) before it."""
    with accounts_broker(tmp_path) as b:
        (tmp_path / "edge.password").write_text(USERS["edge-h1"] + "\n")
        edge, _ = spawn_edge(SimpleNamespace(url=b["url"]), tmp_path / "edge", tmp_path / "edge.log", "h1",
                             "--tls-ca", str(b["ca"]), "--username", "edge-h1",
                             "--password-file", str(tmp_path / "edge.password"))
        try:
            a = Client(b, "w-a", "h1-w-b")
            fake = DeviceRegistration(hospital="h1", device_id="w-b", device_class="wearable",
                                      patient_id="p-evil", streams={"ecg": 250.0})
            a.publish(B_REGISTRATION, to_wire(fake), retain=True)
            for i in range(10):
                a.publish(B_FRAME, to_wire(_frame("w-b", i, fill=9.0)))
            a.close()
            settings = AgentSettings(broker=b["url"], hospital="h1", device_id="w-b", patient_id="p-b",
                                     streams={"ecg": 250.0}, buffer_path=tmp_path / "b.sqlite", username="w-b",
                                     password=USERS["w-b"], ca_file=b["ca"])
            with DeviceAgent(settings) as agent:
                for i in range(10):
                    agent.publish(_frame("w-b", i))
                assert agent.flush(30)
            wait_status(tmp_path / "edge", lambda s: s["stored"]["total"] >= 10, timeout=60)
        finally:
            assert stop(edge) == 0
    with sqlite3.connect(tmp_path / "edge" / "edge.sqlite3") as con:
        assert con.execute("SELECT device_id, patient_id FROM devices").fetchall() == [("w-b", "p-b")]
        rows = con.execute("SELECT seq, patient_id, payload FROM frames ORDER BY seq").fetchall()
        assert con.execute("SELECT count(*) FROM rejections").fetchone() == (0,)
    assert [(seq, pid) for seq, pid, _ in rows] == [(i, "p-b") for i in range(10)]
    assert all(payload == to_wire(_frame("w-b", seq)) for seq, _, payload in rows)  # b's, not a's


def _frame(device: str, seq: int, fill: float = 0.0) -> SignalFrame:
    return SignalFrame.build(device, "ecg", seq, 1.7e9 + seq, 250.0, np.full(250, fill, dtype=np.float32))


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(agent_mod, "BACKOFF_MAX_S", 0.4)
    monkeypatch.setattr(agent_mod, "BACKOFF_MIN_S", 0.05)


def test_an_agent_whose_user_name_is_not_its_device_id_is_warned_about(tmp_path, caplog):
    settings = AgentSettings(broker="mqtt://127.0.0.1:1", hospital="h1", device_id="w-b", patient_id="p-b",
                             streams={"ecg": 250.0}, buffer_path=tmp_path / "b.sqlite", username="w-a",
                             password="x")
    agent_mod._WARNED_USERNAMES.discard("w-a")
    with caplog.at_level("WARNING", logger="device_agent.agent"):
        DeviceAgent(settings)
        DeviceAgent(settings.model_copy(update={"buffer_path": tmp_path / "c.sqlite"}))
    warned = [r for r in caplog.records if "is not the device id" in r.getMessage()]
    assert len(warned) == 1 and "'w-a'" in warned[0].getMessage()


def issue_client_certs(out: Path, names: tuple[str, ...]) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """A CA for clients and a certificate (common name = account) with its key for each of ``names``."""
    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject: str, key, issuer: x509.Name, signer, ca: bool) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
                .sign(signer, hashes.SHA256()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h1 devices CA")])
    ca_path = out / "clients-ca.pem"
    ca_path.write_bytes(cert("h1 devices CA", ca_key, ca_name, ca_key, True).public_bytes(serialization.Encoding.PEM))
    issued = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        issued[name] = (out / f"{name}.pem", out / f"{name}.key")
        issued[name][0].write_bytes(cert(name, key, ca_name, ca_key, False).public_bytes(serialization.Encoding.PEM))
        issued[name][1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return ca_path, issued


def test_with_client_certificates_the_common_name_is_the_account(tmp_path, fast_backoff):
    work = Path(tempfile.mkdtemp(prefix="iomt-test-certs-"))
    work.chmod(0o755)  # the broker's user reads the server key and the clients' CA
    try:
        tls = make_tls(work / "tls")
        tls["key"].chmod(0o640)
        if os.geteuid() == 0:
            os.chown(tls["key"], 0, broker_account().pw_gid)
        client_ca, certs = issue_client_certs(tmp_path, ("w-a", "w-b", "edge-h1"))
        client_ca = Path(shutil.copy(client_ca, work / "clients-ca.pem"))
        client_ca.chmod(0o644)
        port = free_port()
        proc = spawn_iomt("-v", "broker", "--port", str(port), "--hospital", "h1", "--client-ca", str(client_ca),
                          "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]), log=tmp_path / "broker.log")
        try:
            wait_port(port, timeout=60)
            url = f"mqtts://127.0.0.1:{port}"
            edge, _ = spawn_edge(SimpleNamespace(url=url), tmp_path / "edge", tmp_path / "edge.log", "h1",
                                 "--tls-ca", str(tls["ca"]), "--tls-cert", str(certs["edge-h1"][0]),
                                 "--tls-key", str(certs["edge-h1"][1]))
            try:
                # w-a's certificate, claiming w-b as user name: the certificate decides
                a = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="h1-w-b")
                a.tls_set(ca_certs=str(tls["ca"]), certfile=str(certs["w-a"][0]), keyfile=str(certs["w-a"][1]))
                a.username_pw_set("w-b", "anything")
                a.connect("127.0.0.1", port)
                a.loop_start()
                fake = DeviceRegistration(hospital="h1", device_id="w-b", device_class="wearable",
                                          patient_id="p-evil", streams={"ecg": 250.0})
                a.publish(B_REGISTRATION, to_wire(fake), qos=1, retain=True).wait_for_publish(20)
                a.publish(B_FRAME, to_wire(_frame("w-b", 0, fill=9.0)), qos=1).wait_for_publish(20)
                a.disconnect()
                a.loop_stop()
                no_cert = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="anon")
                no_cert.tls_set(ca_certs=str(tls["ca"]))
                no_cert.on_connect = lambda *args: accepted.append(args[3])
                accepted: list = []
                with contextlib.suppress(OSError):  # TLS 1.3: the refusal may come after connect()
                    no_cert.connect("127.0.0.1", port)
                    no_cert.loop_start()
                    time.sleep(SETTLE_S)
                no_cert.loop_stop()
                assert accepted == [] and not no_cert.is_connected()
                settings = AgentSettings(broker=url, hospital="h1", device_id="w-b", patient_id="p-b",
                                         streams={"ecg": 250.0}, buffer_path=tmp_path / "b.sqlite",
                                         ca_file=tls["ca"], cert_file=certs["w-b"][0], key_file=certs["w-b"][1])
                with DeviceAgent(settings) as agent:
                    for i in range(5):
                        agent.publish(_frame("w-b", i))
                    assert agent.flush(30)
                wait_status(tmp_path / "edge", lambda s: s["stored"]["total"] >= 5, timeout=60)
            finally:
                assert stop(edge) == 0
        finally:
            stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with sqlite3.connect(tmp_path / "edge" / "edge.sqlite3") as con:
        assert con.execute("SELECT device_id, patient_id FROM devices").fetchall() == [("w-b", "p-b")]
        assert con.execute("SELECT seq, patient_id FROM frames ORDER BY seq").fetchall() == [(i, "p-b")
                                                                                            for i in range(5)]
        assert con.execute("SELECT count(*) FROM rejections").fetchone() == (0,)
