from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.utils.procs import Mosquitto


@pytest.fixture
def durable_broker(tmp_path):
    """Mosquitto that keeps sessions and queued QoS 1 messages across a restart (like a hospital's)."""
    # A root-started Mosquitto drops to its own user, which cannot enter pytest's 0700 tmp dirs.
    store = Path(tempfile.mkdtemp(prefix="iomt-mosquitto-"))
    store.chmod(0o777)
    broker = Mosquitto(tmp_path)
    with broker.conf.open("a") as fh:
        fh.write(f"persistence true\npersistence_location {store}/\nautosave_interval 1\n")
    broker.start()
    yield broker
    broker.stop()
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaked_agents():
    """Every agent a test starts is closed by it (no network thread outlives its test)."""
    import threading
    yield
    alive = [t.name for t in threading.enumerate() if t.name.startswith("agent-")]
    assert not alive, f"agent threads still running: {alive}"
