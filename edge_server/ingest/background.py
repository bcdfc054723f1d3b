"""The edge daemon's background preprocessing: rebuilds stale patient records from what
ingest stored, on its own thread and store connection, so ingest never waits for it."""
from __future__ import annotations

import logging
import threading

from edge_server.ingest.settings import EdgeSettings
from edge_server.ingest.sqlite_store import SqliteStore

log = logging.getLogger(__name__)


class BackgroundPreprocessor:
    """Rebuilds stale patient records in the background, on its own store connection."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-preprocess", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        from edge_server.dataset.records import refresh_records
        from edge_server.dataset.preprocess import load_text_embedder

        s = self.settings
        embedder = load_text_embedder(s.text_embedder)
        store = SqliteStore(s.data_dir, synchronous=s.sqlite_synchronous)
        try:
            while not self._stop.wait(s.preprocess_interval_s):
                try:
                    refresh_records(store, s.hospital, embedder)
                except Exception:  # noqa: BLE001 - keep ingesting whatever preprocessing does
                    log.exception("preprocessing failed; will retry")
        finally:
            store.close()
