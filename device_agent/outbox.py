"""The agent's on-disk buffer: messages wait here, in order, until the broker acknowledges them."""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)


class Outbox:
    """A FIFO of (topic, payload) rows in SQLite (WAL mode).

    Rows are removed only by :meth:`ack`, i.e. after the broker's PUBACK, so a crash of the
    agent or an outage of the broker loses nothing that was added. ``path=None`` keeps the
    table in memory. Used by one thread only (the agent's network thread).
    """

    def __init__(self, path: Path | None, max_rows: int) -> None:
        self.max_rows = max_rows
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(":memory:" if path is None else str(path), check_same_thread=False,
                                   isolation_level=None)
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a crash of the process (not of the OS) and keeps
            # commits cheap; every batch is one transaction.
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "topic TEXT NOT NULL, payload BLOB NOT NULL)")
        self._count = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        if self._count:
            log.info("outbox %s holds %d messages from before a restart", path, self._count)

    def __len__(self) -> int:
        return self._count

    def add(self, rows: list[tuple[str, bytes]]) -> int:
        """Append ``rows`` in order; returns how many did not fit (the newest are refused)."""
        room = max(0, self.max_rows - self._count)
        kept = rows[:room]
        if kept:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO outbox (topic, payload) VALUES (?, ?)", kept)
            self._count += len(kept)
        return len(rows) - len(kept)

    def after(self, row_id: int, limit: int) -> list[tuple[int, str, bytes]]:
        """The oldest ``limit`` rows with an id above ``row_id``."""
        return self._db.execute("SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                (row_id, limit)).fetchall()

    def ack(self, row_ids: list[int]) -> None:
        """Remove acknowledged rows."""
        if not row_ids:
            return
        with self._db:
            self._db.execute("BEGIN")
            cur = self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in row_ids])
        self._count -= cur.rowcount if cur.rowcount >= 0 else len(row_ids)

    def close(self) -> None:
        self._db.close()
