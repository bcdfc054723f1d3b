"""Preprocessing maths and the record the edge builds from its store."""
from __future__ import annotations

import numpy as np
import pytest

from edge_server.dataset import preprocess as pp
from edge_server.dataset.records import build_record, load_records, record_from_bytes, record_to_bytes
from edge_server.ingest.ingestor import Ingestor
from edge_server.ingest.sqlite_store import SqliteStore
from edge_server.ingest.store import Batch
from protocols.fhir import build_bundle
from protocols.schema import (CONDITIONS, EHR_DIM, IMAGE_SIZE, MODEL_SIGNAL_HZ, SIGNAL_CHANNELS, WINDOW_SAMPLES,
                              standardise_ehr)
from simulators import payloads as b


def _tone(freq, fs, seconds):
    return np.sin(2 * np.pi * freq * np.arange(int(fs * seconds)) / fs)


def _power(x, fs, freq):
    spectrum = np.abs(np.fft.rfft(x[:, 0] if x.ndim == 2 else x))
    freqs = np.fft.rfftfreq(len(x), 1 / fs)
    return spectrum[np.argmin(np.abs(freqs - freq))]


def test_ecg_filters_remove_mains_and_drift_keep_the_beat():
    fs = 500.0
    beat, mains, drift = _tone(1.2, fs, 20), _tone(50.0, fs, 20), 3 * _tone(0.05, fs, 20)
    x = beat + mains + drift

    y = pp.notch(pp.bandpass(x, fs, 0.5, 40.0), fs, 50.0)[:, 0]

    assert _power(y, fs, 50.0) < 0.01 * _power(x, fs, 50.0)
    assert _power(y, fs, 0.05) < 0.1 * _power(x, fs, 0.05)
    assert _power(y, fs, 1.2) > 0.8 * _power(x, fs, 1.2)


def test_notch_above_nyquist_is_a_no_op():
    x = _tone(1.0, 64.0, 4)
    assert np.allclose(pp.notch(x, 64.0, 50.0)[:, 0], x)


@pytest.mark.parametrize("fs", [250.0, 360.0, 700.0, 64.0, 32.0, 4.0])
def test_resample_hits_model_rate_and_keeps_slow_content(fs):
    x = _tone(0.5, fs, 16)
    y = pp.resample(x, fs)[:, 0]
    assert len(y) == int(16 * MODEL_SIGNAL_HZ)
    ref = _tone(0.5, MODEL_SIGNAL_HZ, 16)
    assert np.corrcoef(y[25:-25], ref[25:-25])[0, 1] > 0.99


def test_windows_have_schema_shape_with_zeros_for_missing_channels():
    streams = {"ecg": (250.0, _tone(1.2, 250.0, 17)), "acc": (32.0, np.random.default_rng(0).normal(size=(32 * 17, 3)))}

    w = pp.assemble_windows(streams)

    assert w.shape == (2, WINDOW_SAMPLES, len(SIGNAL_CHANNELS)) and w.dtype == np.float32
    filled = {SIGNAL_CHANNELS[i] for i in range(len(SIGNAL_CHANNELS)) if np.abs(w[..., i]).max() > 0}
    assert filled == {"ecg", "acc_x", "acc_y", "acc_z"}


def test_offsets_align_streams_on_one_timeline():
    w = pp.assemble_windows({"eda": (4.0, np.ones(64)), "temp": (4.0, np.ones(32))}, offsets={"temp": 8.0})
    temp = w[..., SIGNAL_CHANNELS.index("temp")].reshape(-1)
    assert np.abs(temp[:int(8 * MODEL_SIGNAL_HZ) - 5]).max() == 0 and temp[int(9 * MODEL_SIGNAL_HZ)] > 0.5


def test_frames_placed_by_time_leave_gaps_for_lost_frames():
    frames = [(100.0, 4.0, np.ones((4, 1))), (102.0, 4.0, 2 * np.ones((4, 1)))]  # the frame at 101 s is lost
    rate, t0, x = pp.stream_from_frames(frames)
    assert (rate, t0, x.shape) == (4.0, 100.0, (12, 1))
    assert x[:4, 0].tolist() == [1] * 4 and x[4:8, 0].tolist() == [0] * 4 and x[8:, 0].tolist() == [2] * 4


def test_image_resized_and_normalised():
    img = pp.preprocess_image(np.arange(200 * 150, dtype=np.uint16).reshape(200, 150))
    assert img.shape == (IMAGE_SIZE, IMAGE_SIZE) and img.dtype == np.float32
    assert abs(float(img.mean())) < 1e-4 and abs(float(img.std()) - 1) < 1e-3
    assert not pp.preprocess_image(np.full((10, 10), 7.0)).any()


def test_patient_record_from_raw_labels_from_condition_and_embeds_text():
    bundle = build_bundle("p1", {"age": 70.0, "heart_rate": 110.0}, "respiratory", ts=0.0)

    rec = pp.patient_record_from_raw("p1", "h1", {"ppg": (64.0, _tone(1.0, 64.0, 8))}, np.ones((32, 32)),
                                     bundle, "cough", text_embedder=lambda t: np.array([len(t)]))

    assert rec.label == CONDITIONS.index("respiratory")
    assert rec.ehr.shape == (EHR_DIM,)
    assert np.allclose(rec.ehr, standardise_ehr({"age": 70.0, "heart_rate": 110.0}), equal_nan=True)
    assert rec.signal_windows.shape == (1, WINDOW_SAMPLES, len(SIGNAL_CHANNELS))
    assert rec.modalities() == ("image", "ehr", "signals", "text")
    assert rec.extra["text_embedding"].tolist() == [5.0]


def test_text_embedder_spec_loads_or_fails_loudly():
    from protocols.errors import ConfigError
    assert pp.load_text_embedder("") is None
    assert pp.load_text_embedder("numpy:atleast_1d") is np.atleast_1d
    with pytest.raises(ConfigError):
        pp.load_text_embedder("no_such_module_xyz:f")


def _fill_store(path):
    ing, batch = Ingestor("h1"), Batch()
    msgs = [b.registration("w-1", "p1"), b.registration("cr-1", "ward", "imaging"),
            b.registration("ehr-1", "ward", "ehr"), b.registration("nt-1", "ward", "notes")]
    msgs += [b.frame("w-1", s, i) for i in range(10) for s in ("ecg", "ppg", "acc")]
    msgs += [b.study("cr-1", "p1", "1.2.3.4"), b.ehr("ehr-1", "p1", "cardiac"), b.note("nt-1", "p1", "n1"),
             b.ehr("ehr-1", "p2", None)]
    for t, p in msgs:
        assert ing.handle(t, p, batch, 1.0).accepted
    store = SqliteStore(path)
    store.set_meta("hospital", "h1")
    store.commit(batch)
    return store


def test_records_built_from_the_store_match_the_pure_function(tmp_path):
    with _fill_store(tmp_path) as store:
        rec = build_record(store, "p1", "h1")

    assert rec.label == CONDITIONS.index("cardiac") and rec.note == "chest pain on exertion"
    assert rec.signal_windows.shape == (1, WINDOW_SAMPLES, len(SIGNAL_CHANNELS))
    assert rec.image.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert rec.extra["sources"] == {"frames": 30, "images": 1, "ehr": 1, "notes": 1}
    ecg = np.concatenate([np.frombuffer(b.frame("w-1", "ecg", i)[1][-4 - 250 * 4:-4], "<f4") for i in range(10)])
    direct = pp.assemble_windows({"ecg": (250.0, ecg)})
    assert np.allclose(rec.signal_windows[..., 0], direct[..., 0], atol=1e-5)


def test_load_records_caches_and_rebuilds_when_new_rows_arrive(tmp_path):
    _fill_store(tmp_path).close()

    first = {r.patient_id: r for r in load_records(tmp_path)}
    again = {r.patient_id: r for r in load_records(tmp_path)}

    assert sorted(first) == ["p1", "p2"] and first["p2"].label is None and first["p2"].signal_windows is None
    assert np.array_equal(first["p1"].signal_windows, again["p1"].signal_windows)
    with SqliteStore(tmp_path) as store:
        assert store.cached_record("p1")[0] == store.patient_version("p1")
        ing = Ingestor("h1", store.devices())
        batch = Batch()
        for i in range(10, 18):
            ing.handle(*b.frame("w-1", "ecg", i), batch, 2.0)
        store.commit(batch)
    assert len({r.patient_id: r for r in load_records(tmp_path)}["p1"].signal_windows) == 2


def test_load_records_without_a_store_is_empty_and_creates_nothing(tmp_path):
    assert load_records(tmp_path / "nothing") == []
    assert not (tmp_path / "nothing").exists()


def test_record_bytes_round_trip():
    rec = pp.patient_record_from_raw("p1", "h1", None, np.eye(8), None, "x", label=2,
                                     text_embedder=lambda t: np.zeros(3))
    back = record_from_bytes(record_to_bytes(rec))
    assert (back.patient_id, back.hospital, back.label, back.note) == ("p1", "h1", 2, "x")
    assert np.array_equal(back.image, rec.image) and back.ehr is None and back.signal_windows is None
    assert back.extra["text_embedding"].shape == (3,)
