from __future__ import annotations

import pytest

from iomt.local_broker import Mosquitto


@pytest.fixture
def durable_broker(tmp_path):
    """Mosquitto that keeps sessions and queued QoS 1 messages across a restart (like a hospital's):
    the documented `iomt broker --data-dir D`."""
    broker = Mosquitto(tmp_path, persistence=True).start()
    yield broker
    broker.stop()


@pytest.fixture(autouse=True)
def no_leaked_agents():
    """Every agent a test starts is closed by it (no network thread outlives its test)."""
    import threading
    yield
    alive = [t.name for t in threading.enumerate() if t.name.startswith("agent-")]
    assert not alive, f"agent threads still running: {alive}"
