"""Run a real `iomt edge run` against a real Mosquitto and publish to it with paho."""
from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_server.ingest.sqlite_store import SqliteStore
from iomt.supervisor import free_port, spawn_iomt


def spawn_edge(broker, data_dir: Path, log: Path, hospital: str = "h1", *extra: str):
    """Start the daemon; returns ``(proc, metrics_port)`` once it is subscribed."""
    port = free_port()
    proc = spawn_iomt("-v", "edge", "run", "--hospital", hospital, "--broker", broker.url, "--data-dir",
                      str(data_dir), "--metrics-port", str(port), "--preprocess-interval", "0", *extra, log=log)
    wait_healthy(port, proc, log)
    return proc, port


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        return resp.read().decode()


def wait_healthy(port: int, proc, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"edge exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if health(port).get("ok"):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"edge not healthy within {timeout}s:\n{log.read_text()[-3000:]}")


def status(data_dir: Path) -> dict:
    with SqliteStore(data_dir) as store:
        return store.status()


def wait_status(data_dir: Path, done: Callable[[dict], bool], timeout: float = 60.0) -> dict:
    """Poll the store until ``done(status)``; returns the last status either way."""
    deadline = time.monotonic() + timeout
    st = {}
    while time.monotonic() < deadline:
        if (data_dir / "edge.sqlite3").exists():
            st = status(data_dir)
            if done(st):
                return st
        time.sleep(0.2)
    return st


class Publisher:
    """A plain paho client publishing QoS 1 (what any device could send, good or bad)."""

    def __init__(self, broker, client_id: str = "test-publisher") -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def publish(self, messages: Iterable[tuple[str, bytes]], retain: bool = False) -> int:
        infos = [self.client.publish(t, p, qos=1, retain=retain) for t, p in messages]
        for info in infos:
            info.wait_for_publish(30)
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
