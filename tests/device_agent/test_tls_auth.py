"""The device agent against a real Mosquitto that speaks only TLS and wants a password."""
from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

import device_agent.agent as agent_mod
from device_agent.agent import DeviceAgent
from device_agent.settings import AgentSettings
from protocols.auth import make_tls
from protocols.messages import SignalFrame
from iomt.mqtt_collector import Collector
from tests.device_agent.secure_broker import SecureMosquitto
from iomt.supervisor import run_iomt

pytestmark = pytest.mark.integration

USERS = {"w-1": "device-secret", "w-5": "cli-secret", "collector": "collector-secret"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = SecureMosquitto(tmp_path_factory.mktemp("secure-broker"), USERS).start()
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def recorded_backoff(monkeypatch):
    """Shrink the backoff and record every attempt number the agent asks a delay for."""
    monkeypatch.setattr(agent_mod, "BACKOFF_MAX_S", 0.4)
    monkeypatch.setattr(agent_mod, "BACKOFF_MIN_S", 0.05)
    attempts: list[int] = []
    real = agent_mod.backoff_delay

    def spy(attempt, rng):
        attempts.append(attempt)
        return real(attempt, rng)

    monkeypatch.setattr(agent_mod, "backoff_delay", spy)
    return attempts


def agent_settings(mosq, tmp_path, **kw):
    base = dict(broker=mosq.url, hospital="h1", device_id="w-1", patient_id="p-1", streams={"ecg": 250.0},
                buffer_path=tmp_path / "buffer.sqlite", username="w-1", password=USERS["w-1"],
                ca_file=mosq.ca_file)
    return AgentSettings(**{**base, **kw})


def frame(seq, device="w-1"):
    return SignalFrame.build(device, "ecg", seq, 1.7e9 + seq, 250.0, np.full(250, seq % 5, dtype=np.float32))


def collector(broker):
    return Collector(broker.port, ca_file=broker.ca_file, username="collector", password=USERS["collector"])


def seqs(sub, device="w-1"):
    return [m.seq for t, m in sub.decoded("ecg") if t.device_id == device]


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)
    return predicate()


def connack(port, tls_ca=None, **auth) -> str:
    """The CONNACK reason a plain paho client gets, or the error that stopped it before one."""
    got: list[str] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{len(auth)}-{tls_ca is not None}")
    if auth:
        client.username_pw_set(auth["username"], auth["password"])
    if tls_ca is not None:
        client.tls_set(ca_certs=str(tls_ca))
    client.on_connect = lambda c, u, f, rc, p: (got.append(str(rc)), done.set())
    client.on_disconnect = lambda *a: done.set()
    try:
        client.connect("127.0.0.1", port, keepalive=5)
        client.loop_start()
        done.wait(5)
    except OSError as err:
        return f"error: {err}"
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0] if got else "no CONNACK"


def test_broker_enforces_tls_and_passwords(broker):
    # Without this, the tests below would prove nothing about TLS or credentials.
    assert connack(broker.port, broker.ca_file, username="collector", password=USERS["collector"]) == "Success"
    assert connack(broker.port, broker.ca_file) == "Not authorized"                      # anonymous
    assert connack(broker.port, broker.ca_file, username="collector", password="nope") == "Not authorized"
    assert connack(broker.port, None, username="collector", password=USERS["collector"]) == "no CONNACK"  # no TLS


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_publishes_every_frame_over_tls_with_password(broker, tmp_path, version, recorded_backoff):
    sub = collector(broker)
    with DeviceAgent(agent_settings(broker, tmp_path, mqtt_version=version,
                                    client_id=f"w-1-{version}")) as agent:
        assert agent.wait_connected(10)
        for i in range(200):
            agent.publish(frame(i))
        assert agent.flush(30)
        assert agent.stats["acked"] == 200 and agent.buffered == 0
        assert agent.stats["tls_failures"] == 0 and agent.stats["auth_refused"] == 0
    assert sub.wait_for(lambda c: len(seqs(c)) >= 200)
    assert seqs(sub) == list(range(200))
    assert sub.decoded("registration")[0][1].device_id == "w-1"
    np.testing.assert_array_equal(sub.decoded("ecg")[13][1].samples[:, 0], np.full(250, 13 % 5))
    assert recorded_backoff == []                            # connected at the first try
    sub.close()


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_wrong_password_is_refused_with_log_counter_and_growing_backoff(broker, tmp_path, version, caplog,
                                                                        recorded_backoff):
    caplog.set_level(logging.INFO, logger="device_agent.agent")
    agent = DeviceAgent(agent_settings(broker, tmp_path, password="wrong", mqtt_version=version)).start()
    try:
        for i in range(20):
            agent.publish(frame(i))
        assert wait_until(lambda: agent.stats["auth_refused"] >= 4)
        assert not agent.connected and agent._thread.is_alive()          # retrying, not crashed
        assert agent.buffered == 20                                      # nothing lost meanwhile
    finally:
        agent.close()
    # Each retry waits longer (up to the cap): the attempt counter is never reset by a refusal.
    assert recorded_backoff[:4] == [0, 1, 2, 3]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refused user 'w-1'" in m and "username/password" in m for m in errors), errors
    # Once the password is right, everything buffered during the refusals arrives.
    sub = collector(broker)
    with DeviceAgent(agent_settings(broker, tmp_path, mqtt_version=version)) as agent:
        assert agent.flush(30)
    assert sub.wait_for(lambda c: seqs(c) == list(range(20))), seqs(sub)
    sub.close()


def test_untrusted_ca_is_a_clear_tls_error(broker, tmp_path, caplog, recorded_backoff):
    caplog.set_level(logging.INFO, logger="device_agent.agent")
    other = make_tls(tmp_path / "other-ca")                     # a CA that did not sign the broker
    agent = DeviceAgent(agent_settings(broker, tmp_path, ca_file=other["ca"])).start()
    try:
        agent.publish(frame(0))
        assert wait_until(lambda: agent.stats["tls_failures"] >= 3)
        assert not agent.connected and agent.stats["connects"] == 0 and agent.buffered == 1
    finally:
        agent.close()
    assert recorded_backoff[:3] == [0, 1, 2]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("TLS handshake" in m and "CERTIFICATE_VERIFY_FAILED" in m and "not trusted" in m
               for m in errors), errors


def test_tls_settings_are_checked_up_front(broker, tmp_path):
    with pytest.raises(ValidationError, match="need a TLS broker"):
        agent_settings(broker, tmp_path, broker=f"mqtt://127.0.0.1:{broker.port}")
    with pytest.raises(ValidationError, match="not a readable file"):
        agent_settings(broker, tmp_path, ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValidationError, match="password without username"):
        agent_settings(broker, tmp_path, username=None)


def test_iomt_device_cli_over_tls_with_password_file(broker, tmp_path):
    sub = collector(broker)
    secret = tmp_path / "password"
    secret.write_text(USERS["w-5"] + "\n")
    base = ["device", "--broker", broker.url, "--hospital", "h1", "--device-id", "w-5", "--username", "w-5",
            "--ca-file", str(broker.ca_file), "--buffer", str(tmp_path / "cli.sqlite")]
    proc = run_iomt(*base, "--password-file", str(secret), "--duration", "3", "--fast", "--json", timeout=120)
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["acked"] == 3 and stats.get("auth_refused", 0) == 0
    assert sub.wait_for(lambda c: seqs(c, "w-5") == [0, 1, 2]), seqs(sub, "w-5")
    sub.close()
    bad = run_iomt(*base[:-2], "--broker", f"mqtt://127.0.0.1:{broker.port}", "--duration", "1", check=False)
    assert bad.returncode == 2 and "need a TLS broker" in bad.stderr
