"""Device -> edge ingest through a real Mosquitto, against a bare paho subscriber on the same broker.

Run: ``python bench/bench_ingest.py [--devices 50 --seconds 60 --publishers 2 --rate 5000]``.

Each simulated device publishes one-second frames of all six wearable streams (ECG 250 Hz,
PPG 64 Hz, EDA 4 Hz, 3-axis accelerometer 32 Hz, temperature 4 Hz, respiration 25 Hz) with
QoS 1 from ``--publishers`` processes of ``bench/mqtt_loadgen.py``, a raw-socket MQTT
publisher that is a bench tool, not the device agent (devices publish through paho; the
agent's on-disk outbox is not what is measured here): it offers 5,000 frames/s with a few
percent of a core, which paho publishers sharing a core with the broker could not. A frame's ``start_ts`` is its publish time, so publish -> stored
latency is ``stored_at - start_ts`` (one clock, one machine).

Two consumers take the same stream in turn, each pinned to CPU 0 (publishers and broker to
the other CPUs when there are any):

* baseline: a bare paho subscriber (QoS 1, auto-ack, counts and timestamps messages);
* edge: ``iomt edge run`` (validation, dedupe, SQLite commit, ack after commit).

Two phases per consumer:

* drain (throughput): the consumer's persistent session exists but it is offline while
  everything is published, so the broker holds a backlog; then the consumer starts and we
  time it from its first delivery to its last stored frame. This measures what the consumer
  can sustain, not how fast the publishers are.
* live (latency): publishers offer ``--rate`` frames/s in total while the consumer runs;
  publish -> stored latency p50/p99. If the publishers cannot reach ``--rate`` the achieved
  rate is printed.

Results are printed as JSON; lost = published - stored (distinct frames). In each phase
each consumer's CPU seconds (bare: from its first delivery; edge: its whole life
minus its start-up up to being subscribed) give ``frames_per_cpu_s``: what one core would
sustain, which a shared, loaded machine's wall-clock rates understate; ``runqueue_wait_s``
is how long the consumer was runnable but waiting for its CPU (other work on the core).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from protocols.messages import DeviceRegistration, to_wire  # noqa: E402
from protocols.schema import SIGNAL_STREAMS  # noqa: E402
from bench.mqtt_loadgen import frame_plan, publish  # noqa: E402
from iomt.local_broker import Mosquitto  # noqa: E402
from iomt.supervisor import child_env, free_port, iomt_argv, spawn, stop, wait_port  # noqa: E402

HOSPITAL = "bench"
_START_TS = struct.Struct("<d")
START_TS_OFFSET = 13  # magic(4) + version(1) + seq(8), see protocols.frames


def _pin(cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError):
        pass


def _other_cpus() -> set[int]:
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else {0}
    return (cpus - {0}) or cpus


def device_ids(n: int) -> list[str]:
    return [f"b-w{i:04d}" for i in range(n)]


def register_devices(port: int, devices: list[str]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-registrar", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    streams = {s: rate for s, (_, rate) in SIGNAL_STREAMS.items()}
    infos = [client.publish(f"iomt/{HOSPITAL}/wearable/{d}/registration",
                            to_wire(DeviceRegistration(hospital=HOSPITAL, device_id=d, device_class="wearable",
                                                       patient_id=f"p-{d}", streams=streams)),
                            qos=1, retain=True) for d in devices]
    for info in infos:
        info.wait_for_publish(30)
    client.disconnect()
    client.loop_stop()


def _publisher(port: int, devices: list[str], seconds: int, rate: float, out: mp.Queue) -> None:
    """Publish every device's frames for ``seconds`` simulated seconds; ``rate`` frames/s (0: max)."""
    _pin(_other_cpus())
    rng = np.random.default_rng(len(devices))
    blocks = {s: rng.normal(size=(int(r), c)).astype("<f4").tobytes() for s, (c, r) in SIGNAL_STREAMS.items()}
    plan = frame_plan(HOSPITAL, devices, seconds, SIGNAL_STREAMS)
    out.put(publish(port, f"bench-pub-{os.getpid()}", plan, blocks, rate))


def publish_all(port: int, devices: list[str], seconds: int, publishers: int, rate: float) -> dict:
    out: mp.Queue = mp.Queue()
    groups = [devices[i::publishers] for i in range(publishers)]
    procs = [mp.Process(target=_publisher, args=(port, g, seconds, rate / publishers, out)) for g in groups]
    for p in procs:
        p.start()
    results = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    sent = sum(r[0] for r in results)
    wall = max(r[1] for r in results)
    return {"published": sent, "publish_wall_s": round(wall, 3), "publish_rate": round(sent / wall, 1)}


def _bare_subscriber(port: int, client_id: str, expected: int, drain: bool, v5: bool, ready, go,
                     out: mp.Queue) -> None:
    """The baseline: QoS 1, auto-ack; notes arrival time and start_ts of each frame."""
    _pin({0})
    arrivals = np.zeros(expected, dtype=np.float64)
    lat = np.zeros(expected, dtype=np.float64)
    count = [0]
    cpu0 = [0.0]
    wait0 = [0.0]

    def on_message(client, userdata, msg):
        i = count[0]
        if msg.topic.endswith("/registration") or i >= expected:
            return
        now = time.time()
        if i == 0:
            cpu0[0] = time.process_time()
            wait0[0] = _runqueue_wait()
        arrivals[i] = now
        lat[i] = now - _START_TS.unpack_from(msg.payload, START_TS_OFFSET)[0]
        count[0] = i + 1

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else False)
    client.on_message = on_message
    client.on_subscribe = lambda *a: ready.set()
    client.connect("127.0.0.1", port, **({"clean_start": True, "properties": props} if v5 else {}))
    client.subscribe(f"iomt/{HOSPITAL}/#", qos=1)
    if drain:  # leave the session (and subscription) on the broker while the backlog builds
        while not ready.is_set():
            client.loop(0.05)
        client.disconnect()
        go.wait()
        client.connect("127.0.0.1", port, **({"clean_start": False, "properties": props} if v5 else {}))
    idle_since, seen = time.monotonic(), 0
    while count[0] < expected:
        client.loop(0.05)
        if count[0] != seen:
            seen, idle_since = count[0], time.monotonic()
        elif time.monotonic() - idle_since > 30:
            break
    n = count[0]
    out.put({"stored": n, "span_s": float(arrivals[n - 1] - arrivals[0]) if n > 1 else 0.0,
             "latency_s": lat[:n].tolist(), "cpu_s": time.process_time() - cpu0[0],
             "runqueue_wait_s": _runqueue_wait() - wait0[0]})
    client.disconnect()


def run_bare(port: int, devices: list[str], seconds: int, publishers: int, rate: float, drain: bool,
             v5: bool = True) -> dict:
    expected = len(devices) * seconds * len(SIGNAL_STREAMS)
    ready, go, out = mp.Event(), mp.Event(), mp.Queue()
    client_id = f"bench-bare-{time.time_ns()}"
    sub = mp.Process(target=_bare_subscriber, args=(port, client_id, expected, drain, v5, ready, go, out))
    sub.start()
    ready.wait(30)
    pub = publish_all(port, devices, seconds, publishers, 0.0 if drain else rate)
    go.set()
    res = out.get(timeout=900)
    sub.join()
    forget_session(port, client_id)
    out = _summary("bare paho subscriber", "drain" if drain else "live", pub, res["stored"], res["span_s"],
                   np.array(res["latency_s"]))
    out["frames_per_cpu_s"] = round(res["stored"] / res["cpu_s"], 1) if res["cpu_s"] else None
    out["runqueue_wait_s"] = round(res["runqueue_wait_s"], 2)
    return out


def _spawn_edge(broker: Mosquitto, data: Path, workdir: Path, extra: list[str]) -> subprocess.Popen:
    mport = free_port()
    cmd = ["taskset", "-c", "0", *iomt_argv()] if _has_taskset() else iomt_argv()
    edge = spawn([*cmd, "edge", "run", "--hospital", HOSPITAL, "--broker", broker.url, "--data-dir", str(data),
                  "--metrics-port", str(mport), "--preprocess-interval", "0", *extra],
                 workdir / "edge.log", child_env(one_thread=True))
    wait_port(mport)
    _wait_healthy(mport)
    return edge


def run_edge(broker: Mosquitto, devices: list[str], seconds: int, publishers: int, rate: float,
             workdir: Path, extra: list[str], drain: bool) -> dict:
    data = workdir / f"edge-{time.time_ns()}"
    edge = _spawn_edge(broker, data, workdir, extra)
    try:
        # CPU of start-up (imports, connect) up to being subscribed, not counted as ingest work.
        startup_cpu, startup_wait = _cpu_seconds(edge.pid), _runqueue_wait(edge.pid)
        if drain:  # its session stays on the broker and collects the backlog
            stop(edge)
        pub = publish_all(broker.port, devices, seconds, publishers, 0.0 if drain else rate)
        if drain:  # the backlog flows as soon as it subscribes: take the first start-up's CPU
            edge = _spawn_edge(broker, data, workdir, extra)
            startup_wait = _runqueue_wait(edge.pid)
        expected = pub["published"]
        db = data / "edge.sqlite3"
        idle_since, last = time.monotonic(), -1
        while True:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                n = con.execute("SELECT count(*) FROM frames").fetchone()[0]
            if n >= expected:
                break
            if n != last:
                last, idle_since = n, time.monotonic()
            elif time.monotonic() - idle_since > 30:
                break
            time.sleep(0.5)
        cpu = _cpu_seconds(edge.pid) - startup_cpu
        wait = _runqueue_wait(edge.pid) - startup_wait
    finally:
        code = stop(edge)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:  # the daemon keeps its client id there
            client_id = con.execute("SELECT value FROM meta WHERE key = 'mqtt_client_id'").fetchone()[0]
        forget_session(broker.port, client_id)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = np.array(con.execute("SELECT received_at, stored_at, start_ts FROM frames").fetchall())
        samples = con.execute("SELECT sum(n_samples * channels) FROM frames").fetchone()[0]
    span = float(rows[:, 1].max() - rows[:, 0].min())
    out = _summary("iomt edge run", "drain" if drain else "live", pub, len(rows), span, rows[:, 1] - rows[:, 2])
    out["samples_per_s"] = round(samples / span, 1) if span else None
    out["frames_per_cpu_s"] = round(len(rows) / cpu, 1) if cpu > 0 else None
    out["runqueue_wait_s"] = round(wait, 2)
    out["edge_exit_code"] = code
    return out


def _runqueue_wait(pid: int | str = "self") -> float:
    """Seconds a process's threads waited for a CPU while runnable (Linux schedstat), 0 if unknown.

    Separates "the consumer was too slow" from "the consumer was starved by other work on
    its core" when a latency tail appears on a shared machine.
    """
    try:
        task = Path(f"/proc/{pid}/task")
        return sum(int((t / "schedstat").read_text().split()[1]) for t in task.iterdir()) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def forget_session(port: int, client_id: str) -> None:
    """End a consumer's persistent session, so later phases do not queue messages for it."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(0.3)
    client.disconnect()
    client.loop_stop()


def _has_taskset() -> bool:
    return subprocess.run(["which", "taskset"], capture_output=True).returncode == 0


def _wait_healthy(port: int, timeout: float = 60) -> None:
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if json.loads(r.read()).get("ok"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("edge did not become healthy")


def _summary(name: str, phase: str, pub: dict, stored: int, span: float, latency: np.ndarray) -> dict:
    out = {
        "consumer": name, "phase": phase, **pub, "stored": stored, "lost": pub["published"] - stored,
        "frames_per_s": round(stored / span, 1) if span else None,
        "latency_p50_ms": round(float(np.percentile(latency, 50)) * 1000, 1) if len(latency) else None,
        "latency_p99_ms": round(float(np.percentile(latency, 99)) * 1000, 1) if len(latency) else None,
    }
    if phase == "drain":  # backlog waited in the broker: latency says nothing about the consumer
        out.pop("latency_p50_ms")
        out.pop("latency_p99_ms")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--seconds", type=int, default=60, help="simulated seconds per device (6 frames each)")
    ap.add_argument("--publishers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=5000.0, help="offered frames/s in total in the live phase")
    ap.add_argument("--live-seconds", type=int, default=None, help="simulated seconds in the live phase")
    ap.add_argument("--mqtt-version", choices=["5", "3.1.1"], default="5", help="for both consumers")
    ap.add_argument("--edge-arg", action="append", default=[], help="extra argument for `iomt edge run`")
    ap.add_argument("--phases", default="drain,live", help="comma-separated subset of drain,live")
    args = ap.parse_args()
    v5 = args.mqtt_version == "5"
    args.edge_arg += ["--mqtt-version", args.mqtt_version]
    devices = device_ids(args.devices)
    live_s = args.live_seconds or args.seconds
    phases = set(args.phases.split(","))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    _pin(_other_cpus())  # this process polls the store: keep it off the consumers' CPU
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work)
        broker.start()
        if _has_taskset() and broker.proc is not None:
            subprocess.run(["taskset", "-a", "-p", "-c", ",".join(map(str, sorted(_other_cpus()))),
                            str(broker.proc.pid)], capture_output=True)
        try:
            register_devices(broker.port, devices)
            if "drain" in phases:
                results["drain_bare"] = run_bare(broker.port, devices, args.seconds, args.publishers, 0, True, v5)
                results["drain_edge"] = run_edge(broker, devices, args.seconds, args.publishers, 0, work,
                                                 args.edge_arg, True)
            if "live" in phases:
                results["live_bare"] = run_bare(broker.port, devices, live_s, args.publishers, args.rate, False,
                                                v5)
                results["live_edge"] = run_edge(broker, devices, live_s, args.publishers, args.rate, work,
                                                args.edge_arg, False)
        finally:
            broker.stop()
    drain_bare, drain_edge = results.get("drain_bare", {}), results.get("drain_edge", {})
    bare, edge = drain_bare.get("frames_per_s"), drain_edge.get("frames_per_s")
    bare_cpu, edge_cpu = drain_bare.get("frames_per_cpu_s"), drain_edge.get("frames_per_cpu_s")
    print(json.dumps({
        "mqtt_version": args.mqtt_version, "cpu_count": os.cpu_count(), "loadavg_before": load,
        "loadavg_after": os.getloadavg(), **results,
        "edge_over_bare_drain": round(edge / bare, 3) if bare and edge else None,
        "edge_over_bare_per_cpu_s": round(edge_cpu / bare_cpu, 3) if bare_cpu and edge_cpu else None,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
