"""The edge's MQTT client id: random per new store and kept there, never derived from public
facts; a store from before keeps the id its broker session is under."""
from __future__ import annotations

from edge_server.ingest.daemon import CLIENT_ID_META, EdgeDaemon
from edge_server.ingest.settings import load_settings
from edge_server.ingest.sqlite_store import SqliteStore


def _client_id(data_dir, **kw) -> str:
    daemon = EdgeDaemon(load_settings(hospital="h1", data_dir=data_dir, **kw))
    try:
        return daemon.client_id
    finally:
        daemon.store.close()


def test_a_new_store_gets_a_random_id_that_survives_restarts(tmp_path):
    first = _client_id(tmp_path / "a")
    assert first == _client_id(tmp_path / "a")  # the broker resumes the same session
    other = _client_id(tmp_path / "b")
    derived = load_settings(hospital="h1", data_dir=tmp_path / "a").stable_client_id()
    assert first.startswith("iomt-edge-h1-") and len(first) == len("iomt-edge-h1-") + 24
    assert first not in (other, derived)


def test_a_store_from_before_keeps_its_derived_id(tmp_path):
    with SqliteStore(tmp_path) as store:
        store.set_meta("hospital", "h1")  # what an older edge left
    assert _client_id(tmp_path) == load_settings(hospital="h1", data_dir=tmp_path).stable_client_id()
    with SqliteStore(tmp_path) as store:
        assert store.get_meta(CLIENT_ID_META) is not None


def test_client_id_flag_wins(tmp_path):
    assert _client_id(tmp_path, client_id="mine") == "mine"
