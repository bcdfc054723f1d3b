"""The device agent against a real Mosquitto: delivery, outages, restarts, last will, limits."""
from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

import device_agent.agent as agent_mod
from device_agent.agent import DeviceAgent, backoff_delay
from device_agent.settings import AgentSettings
from protocols.config import load_settings
from protocols.errors import ConfigError
from protocols.messages import ClinicalNote, Presence, SignalFrame
from iomt.mqtt_collector import Collector
from iomt.supervisor import spawn_iomt, stop


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(agent_mod, "BACKOFF_MAX_S", 0.4)
    monkeypatch.setattr(agent_mod, "BACKOFF_MIN_S", 0.05)


def settings(broker, tmp_path, **kw):
    base = dict(broker=broker.url, hospital="h1", device_id="w-1", patient_id="p-1",
                streams={"ecg": 250.0}, buffer_path=tmp_path / "buffer.sqlite")
    return AgentSettings(**{**base, **kw})


def frame(seq, device="w-1"):
    return SignalFrame.build(device, "ecg", seq, 1.7e9 + seq, 250.0, np.full(250, seq % 7, dtype=np.float32))


def seqs(collector):
    return [m.seq for _, m in collector.decoded("ecg")]


@pytest.mark.integration
@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_publishes_registration_birth_and_frames(mosquitto, tmp_path, version):
    sub = Collector(mosquitto.port)
    with DeviceAgent(settings(mosquitto, tmp_path, mqtt_version=version)) as agent:
        assert agent.wait_connected(10)
        for i in range(50):
            agent.publish(frame(i))
        agent.publish(ClinicalNote(patient_id="p-1", note_id="n1", text="hello", ts=1.0),
                      topic=agent.topic_for(frame(0)).__class__("h1", "notes", "notes-1", "note"))
        assert agent.flush(20)
        assert agent.stats["acked"] == 51 and agent.buffered == 0
    assert sub.wait_for(lambda c: len(seqs(c)) == 50)
    assert seqs(sub) == list(range(50))                      # in order
    reg = sub.decoded("registration")
    assert reg and reg[0][1].device_id == "w-1" and reg[0][1].streams == {"ecg": 250.0}
    assert str(reg[0][0]) == "iomt/h1/wearable/w-1/registration"
    presence = [m.online for _, m in sub.decoded("presence")]
    assert presence[0] is True and presence[-1] is False     # birth, then clean goodbye
    np.testing.assert_array_equal(sub.decoded("ecg")[7][1].samples[:, 0], np.full(250, 0.0))
    sub.close()


@pytest.mark.integration
def test_registration_is_retained(mosquitto, tmp_path):
    with DeviceAgent(settings(mosquitto, tmp_path)) as agent:
        assert agent.wait_connected(10)
        agent.flush(5)
    late = Collector(mosquitto.port)                          # subscribes after the agent left
    assert late.wait_for(lambda c: c.decoded("registration") and c.decoded("presence"))
    assert all(retained for _, _, retained in late.messages)
    assert late.decoded("presence")[-1][1].online is False
    late.close()


@pytest.mark.integration
def test_broker_outage_buffers_on_disk_and_drains_everything_once(durable_broker, tmp_path):
    mosquitto = durable_broker
    sub = Collector(mosquitto.port, durable=True)
    agent = DeviceAgent(settings(mosquitto, tmp_path)).start()
    assert agent.wait_connected(10)
    for i in range(200):
        agent.publish(frame(i))
    assert agent.flush(20)
    mosquitto.stop()
    for i in range(200, 700):
        agent.publish(frame(i))
    time.sleep(0.5)
    assert agent.buffered == 500                              # held while the broker is down
    assert not agent.connected
    mosquitto.start()
    assert agent.flush(30)
    assert sub.wait_for(lambda c: set(seqs(c)) == set(range(700)), timeout=30)
    got = seqs(sub)
    assert sorted(set(got)) == list(range(700))
    after = [s for s in got if s >= 200]
    assert after == sorted(after)                             # drained in order
    assert agent.stats["connects"] == 2 and agent.stats["dropped_queue_full"] == 0
    agent.close()
    sub.close()


@pytest.mark.integration
def test_buffer_survives_agent_restart(mosquitto, tmp_path):
    mosquitto.stop()
    first = DeviceAgent(settings(mosquitto, tmp_path)).start()
    for i in range(100):
        first.publish(frame(i))
    time.sleep(0.3)
    first.close(flush_timeout=0)                              # broker unreachable: nothing delivered
    mosquitto.start()
    sub = Collector(mosquitto.port)
    second = DeviceAgent(settings(mosquitto, tmp_path)).start()
    assert second.buffered == 100                             # read back from the SQLite file
    assert second.flush(20)
    assert sub.wait_for(lambda c: set(seqs(c)) == set(range(100)))
    second.close()
    sub.close()


@pytest.mark.integration
def test_full_memory_queue_drops_with_a_counter(mosquitto, tmp_path, caplog):
    agent = DeviceAgent(settings(mosquitto, tmp_path, queue_max=5))   # not started: nothing drains
    results = [agent.publish(frame(i), block=False) for i in range(8)]
    assert results == [True] * 5 + [False] * 3
    assert agent.stats["dropped_queue_full"] == 3
    assert "memory queue full" in caplog.text
    agent.start()
    assert agent.flush(10)
    agent.close()


@pytest.mark.integration
def test_full_disk_buffer_drops_newest_with_a_counter(durable_broker, tmp_path):
    mosquitto = durable_broker
    sub = Collector(mosquitto.port, durable=True)
    mosquitto.stop()
    agent = DeviceAgent(settings(mosquitto, tmp_path, buffer_max=10)).start()
    for i in range(15):
        agent.publish(frame(i))
    deadline = time.monotonic() + 5
    while agent.stats["dropped_buffer_full"] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.stats["dropped_buffer_full"] == 5 and agent.buffered == 10
    mosquitto.start()
    assert agent.flush(20)
    assert sub.wait_for(lambda c: set(seqs(c)) == set(range(10))), (seqs(sub), sub.messages[:3], (mosquitto.workdir / "mosquitto.log").read_text())
    agent.close()
    sub.close()


@pytest.mark.integration
def test_last_will_arrives_when_the_device_is_killed(mosquitto, tmp_path):
    sub = Collector(mosquitto.port)
    proc = spawn_iomt("device", "--broker", mosquitto.url, "--hospital", "h1", "--device-id", "w-9",
                      "--patient-id", "p-9", "--streams", "ecg:500,acc", "--buffer", str(tmp_path / "b.sqlite"),
                      log=tmp_path / "device.log")
    try:
        assert sub.wait_for(lambda c: len(c.decoded("acc")) >= 1 and c.decoded("presence"), timeout=30), \
            (tmp_path / "device.log").read_text()
        assert sub.decoded("presence")[0][1] == sub.decoded("presence")[0][1].model_copy(update={"online": True})
    finally:
        stop(proc, signal.SIGKILL)
    assert sub.wait_for(lambda c: c.decoded("presence")[-1][1].online is False, timeout=30)
    last = sub.decoded("presence")[-1]
    assert str(last[0]) == "iomt/h1/wearable/w-9/presence" and isinstance(last[1], Presence)
    ecg = sub.decoded("ecg")
    assert ecg[0][1].sample_rate == 500.0 and ecg[0][1].n_samples == 500
    sub.close()


@pytest.mark.integration
def test_cli_publishes_a_fixed_duration_and_reports(mosquitto, tmp_path):
    from iomt.supervisor import run_iomt
    sub = Collector(mosquitto.port)
    proc = run_iomt("device", "--broker", mosquitto.url, "--hospital", "h1", "--device-id", "w-2",
                    "--streams", "ppg,temp", "--duration", "20", "--fast", "--json", timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["seconds"] == 20 and report["acked"] == 40
    assert sub.wait_for(lambda c: len(c.decoded("ppg")) == 20 and len(c.decoded("temp")) == 20)
    sub.close()


def test_backoff_grows_with_jitter_and_is_capped():
    import random
    rng = random.Random(0)
    early = [backoff_delay(0, rng) for _ in range(200)]
    late = [backoff_delay(20, rng) for _ in range(200)]
    assert max(early) <= agent_mod.BACKOFF_MIN_S + 1e-9
    assert max(late) <= agent_mod.BACKOFF_MAX_S and np.mean(late) > 3 * np.mean(early)
    assert len(set(late)) > 100                               # jittered, not a fixed schedule


def test_settings_reject_typos_and_wrong_streams(tmp_path):
    with pytest.raises(ValueError):
        AgentSettings(hospital="h", device_id="d", brokr="mqtt://x:1")
    with pytest.raises(ValueError):
        AgentSettings(hospital="h", device_id="d", streams={"study": 0.0})
    with pytest.raises(ValueError):
        AgentSettings(hospital="h", device_id="d", broker="http://x")
    toml = tmp_path / "agent.toml"
    toml.write_text('hospital = "h9"\ndevice_id = "d9"\nbroker = "mqtts://127.0.0.1:8884"\n')
    s = load_settings(AgentSettings, toml, {"device_id": "override"})
    assert (s.hospital, s.device_id, s.tls, s.port) == ("h9", "override", True, 8884)
    toml.write_text('hospital = "h9"\ndevice_id = "d9"\nbufer_path = "x"\n')
    with pytest.raises(ConfigError, match="unknown key 'bufer_path'"):
        load_settings(AgentSettings, toml)
