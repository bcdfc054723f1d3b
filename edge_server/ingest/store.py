"""What the edge keeps: rows as received, and the abstract store every backend implements.

The daemon hands the store one :class:`Batch` per commit; :meth:`Store.commit` applies it
atomically and reports how many rows were new, so the daemon acknowledges the batch's MQTT
deliveries only after they are durable. Deduplication is the store's job: a signal frame is
identified by ``(device_id, stream, seq)`` and every other message kind by its natural id,
each with a UNIQUE constraint, so a redelivered message is counted as a duplicate and never
stored twice.

One row's content never fails a commit: a row the backend refuses (a value outside its
ranges, which validation should already have rejected) is stored as a rejection with reason
``unstorable`` and the rest of the batch is committed (:attr:`CommitResult.refused`). Only
failures of the store itself (I/O, disk full, locking, a trigger) make :meth:`Store.commit`
raise.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

#: Modality (as in protocols.schema.MODALITIES) of each document kind; frames are "signals".
DOCUMENT_MODALITY: dict[str, str] = {"image": "image", "ehr": "ehr", "note": "text"}
#: Device class that publishes each document kind (for the topic of a refused row).
DOCUMENT_CLASS: dict[str, str] = {"image": "imaging", "ehr": "ehr", "note": "notes"}
#: Reason of a rejection the store made: a row whose content it could not hold.
UNSTORABLE = "unstorable"
#: Bytes of a rejected payload kept for diagnosis.
REJECTED_HEAD = 256


class FrameRow(NamedTuple):
    """One signal frame as received (``payload`` is the exact wire bytes).

    A named tuple rather than a dataclass: one is built per frame on the hot path.
    """

    device_id: str
    stream: str
    seq: int
    patient_id: str | None
    start_ts: float
    sample_rate: float
    n_samples: int
    channels: int
    received_at: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class DocumentRow:
    """An imaging study, EHR record or note as received, deduplicated by ``(kind, natural_id)``."""

    kind: str  # a key of DOCUMENT_MODALITY
    natural_id: str
    device_id: str
    stream: str
    patient_id: str | None
    received_at: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """A device registration (the latest one wins)."""

    device_id: str
    device_class: str
    patient_id: str | None
    streams: tuple[str, ...]
    registered_at: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class PresenceRow:
    device_id: str
    online: bool
    at: float


@dataclass(frozen=True, slots=True)
class RejectionRow:
    """A message that failed validation; only its first bytes are kept."""

    reason: str
    topic: str
    device_id: str | None
    detail: str
    size: int
    received_at: float
    payload_head: bytes


@dataclass
class Batch:
    """Everything one commit applies; ``received`` counts every delivery in it."""

    frames: list[FrameRow] = field(default_factory=list)
    documents: list[DocumentRow] = field(default_factory=list)
    devices: list[DeviceRow] = field(default_factory=list)
    presence: list[PresenceRow] = field(default_factory=list)
    rejections: list[RejectionRow] = field(default_factory=list)
    received: int = 0

    def __len__(self) -> int:
        return self.received


def refusal(row: "FrameRow | DocumentRow | DeviceRow", hospital: str | None, detail: str,
            at: float) -> "RejectionRow":
    """The rejection that stands for a row the store could not hold (reason ``unstorable``)."""
    from protocols.ranges import printable

    if isinstance(row, FrameRow):
        cls, stream, received_at = "wearable", row.stream, row.received_at
    elif isinstance(row, DocumentRow):
        cls, stream, received_at = DOCUMENT_CLASS.get(row.kind, row.kind), row.stream, row.received_at
    else:
        cls, stream, received_at = row.device_class, "registration", row.registered_at
    topic = printable(f"iomt/{hospital or '?'}/{cls}/{row.device_id}/{stream}", 300)
    payload = row.payload if isinstance(row.payload, (bytes, bytearray, memoryview)) else b""
    return RejectionRow(UNSTORABLE, topic, printable(row.device_id, 64), printable(detail, 500),
                        len(payload), received_at if isinstance(received_at, float) else at,
                        bytes(payload[:REJECTED_HEAD]))


@dataclass(frozen=True, slots=True)
class CommitResult:
    """New rows per stream (frames) or kind (documents), redelivered rows ignored, rows refused.

    ``refused`` pairs each row the store could not hold with the rejection stored for it.
    """

    stored: dict[str, int]
    duplicates: int
    committed_at: float
    refused: tuple[tuple["FrameRow | DocumentRow | DeviceRow", "RejectionRow"], ...] = ()

    @property
    def stored_total(self) -> int:
        return sum(self.stored.values())


class Store(ABC):
    """Durable storage of one hospital's messages. Implementations: :class:`SqliteStore`."""

    @abstractmethod
    def commit(self, batch: Batch) -> CommitResult:
        """Apply ``batch`` atomically: all of it is durable when this returns, or none.

        Rows the backend cannot hold are not applied but stored as ``unstorable``
        rejections (see :attr:`CommitResult.refused`); this raises only when the store
        itself fails, and then nothing of the batch is applied.
        """

    @abstractmethod
    def devices(self) -> dict[str, DeviceRow]:
        """Every registered device by id."""

    @abstractmethod
    def patients(self) -> list[str]:
        """Ids of every patient with at least one stored frame or document, sorted."""

    @abstractmethod
    def frames(self, patient_id: str) -> Iterator[FrameRow]:
        """The patient's frames ordered by device, stream and sequence number."""

    @abstractmethod
    def documents(self, patient_id: str, kind: str | None = None) -> list[DocumentRow]:
        """The patient's documents (of ``kind``), in the order they were stored."""

    @abstractmethod
    def patient_version(self, patient_id: str) -> str:
        """Changes whenever a row is stored for the patient (keys the record cache)."""

    @abstractmethod
    def cached_record(self, patient_id: str) -> tuple[str, bytes] | None:
        """``(version, blob)`` of the patient's last preprocessed record, if any."""

    @abstractmethod
    def cache_record(self, patient_id: str, version: str, blob: bytes) -> None:
        """Remember a preprocessed record built from the rows at ``version``."""

    @abstractmethod
    def get_meta(self, key: str) -> str | None:
        """A value set with :meth:`set_meta` (e.g. ``hospital``)."""

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None:
        """Remember a small piece of configuration with the data."""

    @abstractmethod
    def status(self) -> dict:
        """``stored``, ``rejected`` (count per reason), ``duplicates``, ``received`` and ``last_seen`` (see ``iomt edge status``)."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend; the store is unusable afterwards."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
