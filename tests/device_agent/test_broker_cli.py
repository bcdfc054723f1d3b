"""`iomt broker`: both the Mosquitto path and the embedded amqtt path carry agent traffic; the
generated config leaves nothing behind; a data directory Mosquitto could not write is refused."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from device_agent.broker_cli import find_mosquitto, mosquitto_config
from device_agent.settings import AgentSettings
from protocols.messages import SignalFrame
from iomt.mqtt_collector import Collector
from iomt.supervisor import child_env, free_port, iomt_argv, run_iomt, spawn, spawn_iomt, stop, wait_port

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="Mosquitto drops privileges only when started as root")


@pytest.mark.integration
@pytest.mark.parametrize("embedded", [False, True], ids=["mosquitto", "embedded"])
def test_broker_command_carries_agent_traffic(tmp_path, embedded):
    if not embedded and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    proc = spawn_iomt("broker", "--port", str(port), "--allow-anonymous", *(["--embedded"] if embedded else []),
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
    finally:  # no assert here: it would hide the failure that brought us here
        rc = stop(proc)
    assert rc is not None, "the broker did not exit on SIGTERM"


def test_mosquitto_config_listens_where_asked(tmp_path):
    conf = mosquitto_config("127.0.0.1", 1999, tmp_path)
    assert "listener 1999 127.0.0.1" in conf and "persistence true" in conf
    assert "autosave_on_changes false" in conf and "autosave_interval 1" in conf
    assert "user" not in conf
    assert "persistence false" in mosquitto_config("127.0.0.1", 1999, None)
    on_changes = mosquitto_config("127.0.0.1", 1999, tmp_path, user="mosquitto", autosave_changes=1)
    assert "user mosquitto" in on_changes and "autosave_on_changes true\nautosave_interval 1" in on_changes


def _broker_leaves_nothing(tmp_path, prelude: str) -> tuple[str, int]:
    """Run `iomt broker` with a private TMPDIR, stop it with SIGTERM; its command line and exit code."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    code = prelude + f"from iomt.cli import main; raise SystemExit(main(['broker', '--port', '{port}', '--allow-anonymous']))"
    proc = spawn([iomt_argv()[0], "-c", code], tmp_path / "broker.log", child_env({"TMPDIR": str(tmp)}, one_thread=True))
    try:
        wait_port(port)
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    finally:
        rc = stop(proc, signal.SIGTERM)
    assert list(tmp.iterdir()) == [], "the broker left files in TMPDIR"
    return cmdline, rc


@pytest.mark.integration
@needs_mosquitto
def test_generated_config_is_in_memory_and_nothing_is_left_after_sigterm(tmp_path):
    cmdline, rc = _broker_leaves_nothing(tmp_path, "")
    assert "mosquitto -c /dev/fd/" in cmdline  # this process became Mosquitto; no config file anywhere
    assert rc == 0


@pytest.mark.integration
@needs_mosquitto
def test_without_memfd_the_temporary_config_is_removed_on_sigterm(tmp_path):
    cmdline, rc = _broker_leaves_nothing(tmp_path, "import os; del os.memfd_create; ")
    assert cmdline.startswith(iomt_argv()[0])  # a parent that forwards signals and cleans up
    assert rc == 0
    assert "mosquitto version" in (tmp_path / "broker.log").read_text()
    assert "terminating" in (tmp_path / "broker.log").read_text()


@pytest.mark.integration
@needs_mosquitto
@as_root
def test_data_dir_the_broker_user_cannot_reach_is_refused(tmp_path):
    closed = tmp_path / "closed"  # pytest's tmp dirs are 0700 root: user mosquitto cannot enter
    out = run_iomt("broker", "--port", str(free_port()), "--allow-anonymous", "--data-dir", str(closed / "d"), check=False, timeout=60)
    assert out.returncode == 2
    assert "cannot enter" in out.stderr and "could not save to" in out.stderr


@pytest.mark.integration
@needs_mosquitto
@as_root
def test_a_data_dir_with_other_files_is_not_handed_to_the_broker_user(tmp_path):
    (tmp_path / "notes.txt").write_text("not the broker's")
    out = run_iomt("broker", "--port", str(free_port()), "--allow-anonymous", "--data-dir", str(tmp_path), check=False, timeout=60)
    assert out.returncode == 2
    assert "holds other files (notes.txt)" in out.stderr
    assert tmp_path.stat().st_uid == 0


@pytest.mark.integration
@needs_mosquitto
@pytest.mark.parametrize("flags, reason", [
    (["--autosave-changes", "0"], "--autosave-changes must be 1 or more"),
    (["--data-dir", "{tmp}/d\nuser root"], "must be single lines"),
], ids=["autosave-0", "config-injection"])
def test_bad_flags_exit_2_with_the_reason(tmp_path, flags, reason):
    flags = [f.format(tmp=tmp_path) for f in flags]
    out = run_iomt("broker", "--port", str(free_port()), "--allow-anonymous", "--data-dir", str(tmp_path / "d"), *flags,
                   check=False, timeout=60)
    assert out.returncode == 2 and reason in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was created
