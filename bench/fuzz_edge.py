"""Adversarial payloads at a live edge beside a simulated hospital: nothing lost, nothing stops.

Run: ``python bench/fuzz_edge.py [--bad 12000 --patients 4 --duration 20]``.

Starts a real Mosquitto and a real ``iomt edge run``, then at the same time

* ``iomt simulate --realtime`` publishes a hospital's cohort through its device agents (valid
  traffic, every modality, one simulated second per second; its JSON report says how many
  messages of each stream it published);
* a raw-socket QoS 1 publisher (``bench/mqtt_loadgen.py``'s connection) sends ``--bad``
  malformed or adversarial payloads of every kind, each of which the edge must reject:
  frames with a seq of 2**63 and more, truncated, with a bad CRC, with NaN or inf samples,
  over 4 MiB; JSON with lone surrogates, nested 100,000 deep, invalid, or not a FHIR Bundle;
  damaged DICOM and deflate bombs (128 MiB of pixels in 130 kB) from a registered and from an
  unregistered device; valid frames from unregistered devices or on malformed topics.

Then checks, and prints as JSON: the daemon is still running and healthy (crashes 0, exit
code none, no traceback or ``internal_error`` in its log); the edge stored exactly what the
simulator reports as published, stream by stream; every adversarial payload is counted as a
rejection (per reason), and the edge's peak memory.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.mqtt_loadgen import Publisher, _utf8, publish_packet  # noqa: E402
from protocols.fhir import build_bundle  # noqa: E402
from protocols.frames import DTYPES, MAX_PAYLOAD, pack_raw  # noqa: E402
from protocols.messages import ClinicalNote, DeviceRegistration, to_wire  # noqa: E402
from simulators import payloads as b  # noqa: E402
from iomt.local_broker import Mosquitto  # noqa: E402
from iomt.supervisor import child_env, free_port, iomt_argv, spawn_iomt, stop, wait_port  # noqa: E402

HOSPITAL = "hF"
F32 = DTYPES["float32"][0]
T0 = 1.7e9


def _topic(cls: str, device: str, stream: str, hospital: str = HOSPITAL) -> str:
    return f"iomt/{hospital}/{cls}/{device}/{stream}"


def _registrations() -> list[tuple[str, bytes]]:
    """The adversary's own registered devices (valid control messages, not counted as bad)."""
    out = []
    for device, cls, streams in (("adv-w", "wearable", {"ecg": 250.0}), ("adv-cr", "imaging", {"study": 0.0}),
                                 ("adv-ehr", "ehr", {"record": 0.0}), ("adv-nt", "notes", {"note": 0.0})):
        reg = DeviceRegistration(hospital=HOSPITAL, device_id=device, device_class=cls, patient_id="adv-p",
                                 streams=streams, ts=T0)
        out.append((_topic(cls, device, "registration"), to_wire(reg)))
    return out


def _frame(seq: int, samples: np.ndarray, device: str = "adv-w") -> bytes:
    return pack_raw(device, "ecg", seq, T0, 250.0, 1, F32, len(samples), samples.astype("<f4").tobytes())


def adversarial(n: int, seed: int = 0) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """``n`` payloads the edge must reject, and how many of each kind (name: the expected reason)."""
    rng = random.Random(seed)
    ok = np.sin(np.arange(250, dtype=np.float32))
    good_frame = _frame(1, ok)
    wt, st_cr, st_ehr, st_nt = (_topic("wearable", "adv-w", "ecg"), _topic("imaging", "adv-cr", "study"),
                                _topic("ehr", "adv-ehr", "record"), _topic("notes", "adv-nt", "note"))
    note = ClinicalNote(patient_id="adv-p", note_id="adv-n", text="TEXT", ts=T0).model_dump_json().encode()
    bundle = build_bundle("adv-p", {"age": 50.0}, "cardiac", ts=T0)
    bundle["id"] = "BID"
    ehr = json.dumps(bundle).encode()
    study = b.study("adv-cr", "adv-p", "1.2.840.99.7", size=8)[1]
    bomb = b.deflated_study("adv-cr", "adv-p", "1.2.840.99.8", 8192, 8192)[1]
    bomb_unknown = b.deflated_study("adv-cr9", "adv-p", "1.2.840.99.9", 8192, 8192)[1]
    nan = ok.copy()
    nan[rng.randrange(250)] = math.nan

    def flip(p: bytes) -> bytes:
        i = rng.randrange(20, len(p) - 4)
        return p[:i] + bytes([p[i] ^ 0x40]) + p[i + 1:]

    # kind -> (expected reason, weight, maker)
    kinds = {
        "huge_seq": ("out_of_range", 20, lambda: (wt, _frame(rng.randrange(2**63, 2**64), ok))),
        "truncated_frame": ("truncated", 10, lambda: (wt, good_frame[:rng.randrange(5, 40)])),
        "bad_crc": ("bad_checksum", 10, lambda: (wt, flip(good_frame))),
        "nan_frame": ("non_finite", 10, lambda: (wt, _frame(rng.randrange(2**40), nan))),
        "bad_magic": ("bad_magic", 5, lambda: (wt, bytes(rng.randrange(256) for _ in range(64)))),
        "oversized": ("oversized", 0.05, lambda: (wt, b"IMSF" + bytes(MAX_PAYLOAD))),
        "surrogate_note": ("bad_text", 8, lambda: (st_nt, note.replace(b'"TEXT"', b'"\\ud800 chest pain"'))),
        "surrogate_bundle_id": ("bad_text", 8, lambda: (st_ehr, ehr.replace(b'"BID"', b'"\\udfff"'))),
        "surrogate_utf8": ("bad_text", 4, lambda: (st_nt, note.replace(b'"TEXT"', b'"\xed\xa0\x80"'))),
        "deep_json": ("bad_json", 1, lambda: (st_ehr, b"[" * 100_000)),
        "bad_json": ("bad_json", 8, lambda: (st_ehr, ehr[:rng.randrange(1, len(ehr) - 1)])),
        "nan_json": ("bad_json", 4, lambda: (st_nt, note.replace(b'"ts":1700000000.0', b'"ts":NaN'))),
        "bad_fhir": ("bad_fhir", 8, lambda: (st_ehr, b'{"resourceType":"Patient","id":"adv-p"}')),
        "huge_fhir_value": ("bad_fhir", 4, lambda: (st_ehr, ehr.replace(b'"value": 50.0', b'"value": ' + b"9" * 400))),
        "bad_dicom": ("bad_dicom", 4, lambda: (st_cr, study[:rng.randrange(140, len(study) - 200)])),
        "deflate_bomb": ("oversized", 0.2, lambda: (st_cr, bomb)),
        "bomb_unregistered": ("unknown_device", 1, lambda: (_topic("imaging", "adv-cr9", "study"), bomb_unknown)),
        "unregistered_sender": ("unknown_device", 8, lambda: (_topic("wearable", f"adv-x{rng.randrange(99)}", "ecg"),
                                                              _frame(2, ok, f"adv-x{rng.randrange(99)}"))),
        "bad_topic": ("bad_topic", 3, lambda: (rng.choice([f"iomt/{HOSPITAL}/toaster/adv-w/ecg", wt + "/x",
                                                           f"iomt/{HOSPITAL}/wearable/adv w/ecg"]), good_frame)),
    }
    names = list(kinds)
    weights = [kinds[k][1] for k in names]
    picks = rng.choices(names, weights, k=n)
    for name in names:  # at least one of every kind
        if name not in picks:
            picks[rng.randrange(n)] = name
    counts: dict[str, int] = {}
    out = []
    for name in picks:
        out.append(kinds[name][2]())
        counts[kinds[name][0]] = counts.get(kinds[name][0], 0) + 1
    return out, counts


class RawPublisher(Publisher):
    """``bench.mqtt_loadgen.Publisher`` sending arbitrary ``(topic, payload)`` pairs."""

    def send_payloads(self, items: list[tuple[str, bytes]]) -> None:
        self.send_packets([publish_packet(_utf8(t), self._next_mid(), p) for t, p in items])


def publish_bad(port: int, items: list[tuple[str, bytes]], rate: float, out: dict) -> None:
    """Publish ``items`` at about ``rate`` per second, in bursts of 50, QoS 1."""
    pub = RawPublisher(port, "fuzz-adversary", window=200)
    t0 = time.monotonic()
    try:
        for i in range(0, len(items), 50):
            while pub.sent - pub.acked > pub.window or pub.sent > rate * (time.monotonic() - t0):
                pub.read_acks(wait=0.01)
            pub.send_payloads(items[i:i + 50])
            pub.read_acks()
        pub.drain()
    finally:
        pub.close()
    out.update(sent=pub.sent, acked=pub.acked, started=t0, ended=time.monotonic())


def _http_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


def _status(data: Path) -> dict:
    db = data / "edge.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        by_stream = dict(con.execute("SELECT stream, count(*) FROM frames GROUP BY stream"))
        for stream, n in con.execute("SELECT stream, count(*) FROM documents GROUP BY stream"):
            by_stream[stream] = by_stream.get(stream, 0) + n
        rejected = dict(con.execute("SELECT reason, count(*) FROM rejections GROUP BY reason ORDER BY reason"))
        counters = dict(con.execute("SELECT name, value FROM counters"))
    return {"by_stream": dict(sorted(by_stream.items())), "rejected": rejected,
            "received": counters.get("received", 0), "duplicates": counters.get("duplicates", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bad", type=int, default=12_000, help="adversarial payloads to publish")
    ap.add_argument("--bad-rate", type=float, default=600.0, help="... at this many per second")
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of signal per simulated patient")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--fast", action="store_true",
                    help="simulate as fast as possible (default: --realtime, so both overlap throughout)")
    args = ap.parse_args()

    bad, expected_rejects = adversarial(args.bad, args.seed)
    with tempfile.TemporaryDirectory(prefix="fuzz-edge-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work).start()
        data, mport = work / "data", free_port()
        log = work / "edge.log"
        edge = spawn_iomt("edge", "run", "--hospital", HOSPITAL, "--broker", broker.url, "--data-dir", str(data),
                          "--metrics-port", str(mport), "--preprocess-interval", "0", log=log)
        try:
            wait_port(mport)
            while not _http_json(f"http://127.0.0.1:{mport}/healthz").get("ok"):
                time.sleep(0.1)
            baseline_mb = _peak_rss_mb(edge.pid)
            regs = RawPublisher(broker.port, "fuzz-registrar")
            regs.send_payloads(_registrations())
            regs.drain()
            regs.close()

            t0 = time.monotonic()
            report = work / "report.json"
            sim = subprocess.Popen([*iomt_argv(), "simulate", "--hospital", HOSPITAL, "--broker", broker.url,
                                    "--patients", str(args.patients), "--duration", str(args.duration),
                                    "--seed", str(args.seed), "--report", str(report),
                                    "--buffer-dir", str(work / "buf"), *([] if args.fast else ["--realtime"])],
                                   env=child_env(one_thread=True), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
            adversary: dict = {}
            thread = threading.Thread(target=publish_bad, args=(broker.port, bad, args.bad_rate, adversary))
            thread.start()
            _, sim_err = sim.communicate(timeout=1800)
            sim_ended = time.monotonic()
            thread.join(1800)
            if sim.returncode != 0:
                print(sim_err.decode()[-3000:], file=sys.stderr)
                return 1
            published = json.loads(report.read_text())["published"]
            want_stored, want_rejected = sum(published.values()), adversary["sent"]
            deadline = time.monotonic() + 300
            st = _status(data)
            while time.monotonic() < deadline and edge.poll() is None and (
                    sum(st["by_stream"].values()) < want_stored or sum(st["rejected"].values()) < want_rejected):
                time.sleep(0.5)
                st = _status(data)
            wall = time.monotonic() - t0
            alive = edge.poll() is None
            health = _http_json(f"http://127.0.0.1:{mport}/healthz") if alive else {}
            peak_mb = _peak_rss_mb(edge.pid) if alive else None
        finally:
            code = stop(edge)
            broker.stop()
        text = log.read_text()
        simulated = {k: v for k, v in published.items()}
        stored_sim = {k: st["by_stream"].get(k, 0) for k in simulated}
        result = {
            "adversarial_sent": adversary.get("sent"), "adversarial_acked_by_broker": adversary.get("acked"),
            "adversarial_publish_s": round(adversary["ended"] - adversary["started"], 1),
            "simulator_s": round(sim_ended - t0, 1),
            "adversary_ran_during_simulation": adversary["started"] < sim_ended,
            "simulator_published": sum(simulated.values()), "simulator_published_by_stream": simulated,
            "stored_by_stream": st["by_stream"], "all_simulated_stored": stored_sim == simulated
            and sum(st["by_stream"].values()) == sum(simulated.values()),
            "rejected_by_reason": st["rejected"], "expected_rejects_by_reason": dict(sorted(expected_rejects.items())),
            "every_adversarial_payload_rejected": st["rejected"] == dict(sorted(expected_rejects.items())),
            "received": st["received"], "duplicates": st["duplicates"],
            "daemon_alive_at_end": alive, "healthy_at_end": bool(health.get("ok")),
            "crashes": 0 if alive else 1, "exit_code_after_sigterm": code,
            "tracebacks_in_log": text.count("Traceback"), "internal_errors": st["rejected"].get("internal_error", 0),
            "edge_peak_rss_mb": {"before": round(baseline_mb, 1), "after": peak_mb and round(peak_mb, 1)},
            "wall_s": round(wall, 1),
        }
        print(json.dumps(result, indent=2))
        ok = (result["all_simulated_stored"] and result["every_adversarial_payload_rejected"] and alive
              and code == 0 and not result["tracebacks_in_log"])
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
