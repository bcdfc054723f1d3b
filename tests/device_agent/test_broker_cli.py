"""`iomt broker`: both the Mosquitto path and the embedded amqtt path carry agent traffic."""
from __future__ import annotations

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from device_agent.broker_cli import find_mosquitto, mosquitto_config
from device_agent.settings import AgentSettings
from protocols.messages import SignalFrame
from tests.device_agent.collector import Collector
from tests.utils.procs import free_port, spawn_iomt, stop, wait_port


@pytest.mark.parametrize("embedded", [False, True], ids=["mosquitto", "embedded"])
def test_broker_command_carries_agent_traffic(tmp_path, embedded):
    if not embedded and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    proc = spawn_iomt("broker", "--port", str(port), *(["--embedded"] if embedded else []),
                      log=tmp_path / "broker.log")
    try:
        wait_port(port, timeout=60)
        sub = Collector(port)
        settings = AgentSettings(broker=f"mqtt://127.0.0.1:{port}", hospital="h1", device_id="w-1",
                                 patient_id="p-1", streams={"ecg": 250.0}, buffer_path=tmp_path / "b.sqlite")
        with DeviceAgent(settings) as agent:
            for i in range(30):
                agent.publish(SignalFrame.build("w-1", "ecg", i, float(i), 250.0, np.zeros(250)))
            assert agent.flush(30)
        assert sub.wait_for(lambda c: len(c.decoded("ecg")) == 30)
        assert sorted(m.seq for _, m in sub.decoded("ecg")) == list(range(30))
        assert sub.decoded("registration")[0][1].patient_id == "p-1"
        sub.close()
        log = (tmp_path / "broker.log").read_text()
        assert ("embedded amqtt broker" in log) == embedded
    finally:
        assert stop(proc) is not None


def test_mosquitto_config_listens_where_asked(tmp_path):
    conf = mosquitto_config("127.0.0.1", 1999, tmp_path)
    assert "listener 1999 127.0.0.1" in conf and "persistence true" in conf
    assert "persistence false" in mosquitto_config("127.0.0.1", 1999, None)
