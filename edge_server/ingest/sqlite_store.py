"""The embedded default store: one SQLite database (WAL) under the edge's data directory.

WAL lets ``iomt edge status`` and training read while the daemon writes. With
``synchronous=NORMAL`` a committed transaction survives the daemon being killed (only a
power cut can lose the last commits; use FULL where that matters), which is what the
acknowledge-after-commit guarantee relies on.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from protocols.ranges import printable

from edge_server.ingest.store import (
    DOCUMENT_MODALITY,
    Batch,
    CommitResult,
    DeviceRow,
    DocumentRow,
    FrameRow,
    Store,
    refusal,
)

log = logging.getLogger(__name__)

DB_NAME = "edge.sqlite3"
#: Extended result codes (sqlite3.Error.sqlite_errorname) of errors caused by one value:
#: a NULL (or NaN, which SQLite binds as NULL) in a NOT NULL column, a failed CHECK, a
#: value too big. A trigger's RAISE (SQLITE_CONSTRAINT_TRIGGER), I/O, a full disk or a
#: lock are the store failing, not the row.
_CONTENT_CODES = frozenset({"SQLITE_CONSTRAINT_NOTNULL", "SQLITE_CONSTRAINT_CHECK", "SQLITE_CONSTRAINT_DATATYPE",
                            "SQLITE_TOOBIG", "SQLITE_MISMATCH"})
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL,
    patient_id TEXT, start_ts REAL NOT NULL, sample_rate REAL NOT NULL,
    n_samples INTEGER NOT NULL, channels INTEGER NOT NULL,
    received_at REAL NOT NULL, stored_at REAL NOT NULL, payload BLOB NOT NULL,
    UNIQUE (device_id, stream, seq)
);
CREATE INDEX IF NOT EXISTS frames_by_patient ON frames (patient_id);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL, natural_id TEXT NOT NULL, device_id TEXT NOT NULL, stream TEXT NOT NULL,
    patient_id TEXT, received_at REAL NOT NULL, stored_at REAL NOT NULL, payload BLOB NOT NULL,
    UNIQUE (kind, natural_id)
);
CREATE INDEX IF NOT EXISTS documents_by_patient ON documents (patient_id);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, device_class TEXT NOT NULL, patient_id TEXT,
    streams TEXT NOT NULL, registered_at REAL NOT NULL, payload BLOB NOT NULL,
    online INTEGER, last_seen REAL
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY, reason TEXT NOT NULL, topic TEXT NOT NULL, device_id TEXT,
    detail TEXT NOT NULL, size INTEGER NOT NULL, received_at REAL NOT NULL, payload_head BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS patient_records (
    patient_id TEXT PRIMARY KEY, version TEXT NOT NULL, built_at REAL NOT NULL, blob BLOB NOT NULL
);
"""


def _content_error(err: BaseException) -> bool:
    """Whether ``err`` is a value the database cannot hold rather than the database failing.

    Python's sqlite3 raises the first kind while binding parameters, before SQLite runs
    anything: OverflowError (an int outside signed 64-bit), UnicodeEncodeError (a str with
    a lone surrogate), InterfaceError/ProgrammingError "Error binding parameter" (a type it
    cannot bind).
    """
    if isinstance(err, (OverflowError, UnicodeEncodeError)):
        return True
    if isinstance(err, (sqlite3.InterfaceError, sqlite3.ProgrammingError)):
        return "binding parameter" in str(err)
    return isinstance(err, sqlite3.DatabaseError) and getattr(err, "sqlite_errorname", None) in _CONTENT_CODES


class SqliteStore(Store):
    """:class:`Store` in ``data_dir/edge.sqlite3``; ``data_dir=":memory:"`` for a throwaway one."""

    def __init__(self, data_dir: Path | str, synchronous: str = "NORMAL", readonly: bool = False) -> None:
        if str(data_dir) == ":memory:":
            target, uri = ":memory:", False
        else:
            path = Path(data_dir)
            if readonly:
                if not (path / DB_NAME).exists():
                    raise FileNotFoundError(f"no edge store at {path / DB_NAME}")
                target, uri = f"file:{path / DB_NAME}?mode=ro", True
            else:
                path.mkdir(parents=True, exist_ok=True)
                target, uri = str(path / DB_NAME), False
        self._db = sqlite3.connect(target, uri=uri, isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
        self._db.execute("PRAGMA busy_timeout = 30000")
        if not readonly:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute(f"PRAGMA synchronous = {synchronous}")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- writes ---------------------------------------------------------------------------
    def commit(self, batch: Batch) -> CommitResult:
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            stored, duplicates = self._apply(batch, now)
            db.execute("COMMIT")
        except BaseException as err:
            db.execute("ROLLBACK")
            if not _content_error(err):
                raise
            return self._commit_isolating(batch, now, err)
        return CommitResult(stored={k: v for k, v in stored.items() if v}, duplicates=duplicates, committed_at=now)

    def _commit_isolating(self, batch: Batch, now: float, first: BaseException) -> CommitResult:
        """Commit ``batch`` without the rows the database refuses for their content.

        The slow path, taken only after a content error: each row is tried alone inside a
        savepoint of a transaction that is then rolled back, so the culprits are found
        without storing anything; the batch is then committed without them, with an
        ``unstorable`` rejection for each. A store failure during the search still raises.
        """
        db = self._db
        hospital = self.get_meta("hospital")
        refused: list[tuple] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for insert, rows in ((self._insert_devices, batch.devices), (self._insert_frames, batch.frames),
                                 (self._insert_documents, batch.documents)):
                for row in rows:
                    db.execute("SAVEPOINT probe")
                    try:
                        insert([row], now)
                    except Exception as err:  # noqa: BLE001 - classified just below
                        if not _content_error(err):
                            raise
                        refused.append((row, refusal(row, hospital, f"{type(err).__name__}: {err}", now)))
                    db.execute("ROLLBACK TO probe")
                    db.execute("RELEASE probe")
        finally:
            db.execute("ROLLBACK")
        if not refused:  # not attributable to a row: treat it as the store failing
            raise first
        out = {id(row) for row, _ in refused}
        clean = Batch(frames=[f for f in batch.frames if id(f) not in out],
                      documents=[d for d in batch.documents if id(d) not in out],
                      devices=[d for d in batch.devices if id(d) not in out], presence=batch.presence,
                      rejections=[*batch.rejections, *(rej for _, rej in refused)], received=batch.received)
        for _, rej in refused:
            log.warning("store refused a row of %s: %s", rej.topic, rej.detail)
        db.execute("BEGIN IMMEDIATE")
        try:
            stored, duplicates = self._apply(clean, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return CommitResult(stored={k: v for k, v in stored.items() if v}, duplicates=duplicates,
                            committed_at=now, refused=tuple(refused))

    def _apply(self, batch: Batch, now: float) -> tuple[dict[str, int], int]:
        """Every statement of a commit, inside the caller's transaction; ``(stored, duplicates)``."""
        db = self._db
        stored: dict[str, int] = {}
        self._insert_devices(batch.devices, now)
        by_stream: dict[str, list[FrameRow]] = {}
        for f in batch.frames:
            by_stream.setdefault(f.stream, []).append(f)
        for stream, rows in by_stream.items():
            stored[stream] = stored.get(stream, 0) + self._insert_frames(rows, now)
        for stream, n in self._insert_documents(batch.documents, now).items():
            stored[stream] = stored.get(stream, 0) + n
        if batch.rejections:
            db.executemany(
                "INSERT INTO rejections (reason, topic, device_id, detail, size, received_at, payload_head)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(r.reason, printable(r.topic), None if r.device_id is None else printable(r.device_id),
                  printable(r.detail, 500), r.size, r.received_at, r.payload_head) for r in batch.rejections])
        seen: dict[str, float] = {}
        for row in (*batch.frames, *batch.documents):
            if row.received_at > seen.get(row.device_id, 0.0):
                seen[row.device_id] = row.received_at
        for p in batch.presence:
            seen[p.device_id] = max(seen.get(p.device_id, 0.0), p.at)
        if seen:
            db.executemany("UPDATE devices SET last_seen = max(coalesce(last_seen, 0), ?) WHERE device_id = ?",
                           [(t, d) for d, t in seen.items()])
        if batch.presence:
            db.executemany("UPDATE devices SET online = ? WHERE device_id = ?",
                           [(int(p.online), p.device_id) for p in batch.presence])
        duplicates = len(batch.frames) + len(batch.documents) - sum(stored.values())
        self._bump(("received", batch.received), ("duplicates", duplicates))
        return stored, duplicates

    def _insert_devices(self, rows: list[DeviceRow], now: float) -> None:
        if rows:
            self._db.executemany(
                "INSERT INTO devices (device_id, device_class, patient_id, streams, registered_at, payload)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET"
                " device_class = excluded.device_class, patient_id = excluded.patient_id,"
                " streams = excluded.streams, registered_at = excluded.registered_at,"
                " payload = excluded.payload",
                [(d.device_id, d.device_class, d.patient_id, json.dumps(list(d.streams)),
                  d.registered_at, d.payload) for d in rows])

    def _insert_frames(self, rows: list[FrameRow], now: float) -> int:
        """Insert frames; returns how many were new."""
        db = self._db
        before = db.total_changes
        if rows:
            db.executemany(
                "INSERT INTO frames (device_id, stream, seq, patient_id, start_ts,"
                " sample_rate, n_samples, channels, received_at, stored_at, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (device_id, stream, seq) DO NOTHING",
                [(*f[:9], now, f[9]) for f in rows])
        return db.total_changes - before

    def _insert_documents(self, rows: list[DocumentRow], now: float) -> dict[str, int]:
        """Insert documents; returns how many were new per stream."""
        db = self._db
        stored: dict[str, int] = {}
        for doc in rows:
            before = db.total_changes
            db.execute(
                "INSERT INTO documents (kind, natural_id, device_id, stream, patient_id,"
                " received_at, stored_at, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (kind, natural_id) DO NOTHING",
                (doc.kind, doc.natural_id, doc.device_id, doc.stream, doc.patient_id,
                 doc.received_at, now, doc.payload))
            stored[doc.stream] = stored.get(doc.stream, 0) + db.total_changes - before
        return stored

    def _bump(self, *pairs: tuple[str, int]) -> None:
        rows = [(name, n) for name, n in pairs if n]
        if rows:
            self._db.executemany("INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                                 " SET value = value + excluded.value", rows)

    def cache_record(self, patient_id: str, version: str, blob: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO patient_records VALUES (?, ?, ?, ?)",
                         (patient_id, version, time.time(), blob))

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # -- reads ----------------------------------------------------------------------------
    def devices(self) -> dict[str, DeviceRow]:
        rows = self._db.execute("SELECT device_id, device_class, patient_id, streams, registered_at, payload"
                                " FROM devices").fetchall()
        return {r[0]: DeviceRow(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4], r[5]) for r in rows}

    def patients(self) -> list[str]:
        rows = self._db.execute("SELECT patient_id FROM frames WHERE patient_id IS NOT NULL UNION"
                                " SELECT patient_id FROM documents WHERE patient_id IS NOT NULL").fetchall()
        return sorted(r[0] for r in rows)

    def frames(self, patient_id: str) -> Iterator[FrameRow]:
        cur = self._db.execute(
            "SELECT device_id, stream, seq, patient_id, start_ts, sample_rate, n_samples, channels,"
            " received_at, payload FROM frames WHERE patient_id = ? ORDER BY device_id, stream, seq",
            (patient_id,))
        for r in cur:
            yield FrameRow(*r)

    def documents(self, patient_id: str, kind: str | None = None) -> list[DocumentRow]:
        sql = ("SELECT kind, natural_id, device_id, stream, patient_id, received_at, payload FROM documents"
               " WHERE patient_id = ?")
        args: tuple = (patient_id,)
        if kind is not None:
            sql, args = sql + " AND kind = ?", (patient_id, kind)
        return [DocumentRow(*r) for r in self._db.execute(sql + " ORDER BY id", args)]

    def patient_version(self, patient_id: str) -> str:
        (f,) = self._db.execute("SELECT coalesce(max(id), 0) FROM frames WHERE patient_id = ?",
                                (patient_id,)).fetchone()
        (d,) = self._db.execute("SELECT coalesce(max(id), 0) FROM documents WHERE patient_id = ?",
                                (patient_id,)).fetchone()
        return f"{f}:{d}"

    def cached_record(self, patient_id: str) -> tuple[str, bytes] | None:
        row = self._db.execute("SELECT version, blob FROM patient_records WHERE patient_id = ?",
                               (patient_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def status(self) -> dict:
        db = self._db
        by_stream = dict(db.execute("SELECT stream, count(*) FROM frames GROUP BY stream").fetchall())
        by_device: dict[str, int] = dict(db.execute("SELECT device_id, count(*) FROM frames GROUP BY device_id"))
        by_modality: dict[str, int] = {"signals": sum(by_stream.values())} if by_stream else {}
        for kind, stream, device, n in db.execute(
                "SELECT kind, stream, device_id, count(*) FROM documents GROUP BY kind, stream, device_id"):
            by_stream[stream] = by_stream.get(stream, 0) + n
            by_device[device] = by_device.get(device, 0) + n
            modality = DOCUMENT_MODALITY.get(kind, kind)
            by_modality[modality] = by_modality.get(modality, 0) + n
        rejected = dict(db.execute("SELECT reason, count(*) FROM rejections GROUP BY reason ORDER BY reason"))
        counters = dict(db.execute("SELECT name, value FROM counters"))
        last_seen = {d: t for d, t in db.execute(
            "SELECT device_id, last_seen FROM devices WHERE last_seen IS NOT NULL ORDER BY device_id")}
        devices = {d: {"class": c, "patient_id": p, "online": None if o is None else bool(o)}
                   for d, c, p, o in db.execute(
                       "SELECT device_id, device_class, patient_id, online FROM devices ORDER BY device_id")}
        (samples,) = db.execute("SELECT coalesce(sum(n_samples * channels), 0) FROM frames").fetchone()
        return {
            "hospital": self.get_meta("hospital"),
            "stored": {"total": sum(by_stream.values()), "by_modality": dict(sorted(by_modality.items())),
                       "by_stream": dict(sorted(by_stream.items())),
                       "by_device": dict(sorted(by_device.items())), "samples": samples},
            "rejected": rejected,
            "rejected_total": sum(rejected.values()),
            "duplicates": counters.get("duplicates", 0),
            "received": counters.get("received", 0),
            "devices": devices,
            "last_seen": last_seen,
        }

    def close(self) -> None:
        self._db.close()
