"""`iomt broker --data-dir D`, as documented, keeps what it acknowledged across a restart under load.

Run as root (Mosquitto then drops to its own user, which must be able to write ``D``) and as
an unprivileged user; devices are real agents, the subscriber a persistent QoS 1 session that
is either connected or offline (an edge under maintenance) while the broker restarts.
"""
from __future__ import annotations

import signal

import pytest

import device_agent.agent as agent_mod
from iomt.broker_restart import restart_under_load
from iomt.local_broker import Mosquitto, as_user, mosquitto_path
from iomt.supervisor import child_env, iomt_argv

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(agent_mod, "BACKOFF_MAX_S", 0.4)
    monkeypatch.setattr(agent_mod, "BACKOFF_MIN_S", 0.05)


def _unprivileged() -> str:
    try:
        as_user("nobody", iomt_argv(), child_env(one_thread=True))
    except LookupError as err:
        pytest.skip(f"cannot run the broker as another user here: {err}")
    return "nobody"


@pytest.mark.parametrize("offline", [False, True], ids=["subscriber-online", "subscriber-offline"])
def test_sigterm_restart_under_load_loses_nothing(tmp_path, offline):
    broker = Mosquitto(tmp_path, persistence=True).start()
    try:
        out = restart_under_load(broker, tmp_path, signal.SIGTERM, devices=3, frames=200, subscriber_offline=offline)
    finally:
        broker.stop()

    assert out.save_errors == 0, broker.log_text()[-2000:]
    assert out.acked_before_stop > 0
    assert out.lost == 0, out


def test_sigterm_restart_as_an_unprivileged_user_loses_nothing(tmp_path):
    broker = Mosquitto(tmp_path, persistence=True, user=_unprivileged()).start()
    try:
        out = restart_under_load(broker, tmp_path, signal.SIGTERM, devices=3, frames=200, subscriber_offline=True)
    finally:
        broker.stop()

    assert out.save_errors == 0, broker.log_text()[-2000:]
    assert out.lost == 0, out
    assert broker.data_dir.stat().st_uid != 0 and (broker.data_dir / "mosquitto.db").exists()


def test_sigkill_with_autosave_on_every_change_loses_at_most_one_pass(tmp_path):
    # Mosquitto sends a PUBACK while handling the PUBLISH and saves at the end of that pass of
    # its event loop, one packet per client per pass: a SIGKILL in between loses at most one
    # acknowledged message per publishing device; everything saved before survives.
    devices = 3
    broker = Mosquitto(tmp_path, persistence=True, broker_args=("--allow-anonymous", "--autosave-changes", "1")).start()
    try:
        out = restart_under_load(broker, tmp_path, signal.SIGKILL, devices=devices, frames=200,
                                 subscriber_offline=True)
    finally:
        broker.stop()

    assert out.save_errors == 0, broker.log_text()[-2000:]
    assert out.acked_before_stop > 100  # the broker held these for the offline subscriber
    assert out.lost <= devices, out
