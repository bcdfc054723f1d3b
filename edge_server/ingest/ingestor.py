"""Validation of one delivery at a time: topic and payload in, a store row or a rejection out.

No MQTT here, so the rules are tested directly and the daemon stays a thin loop. The
sender is checked before the payload is parsed: a data message (frame, study, record, note)
from a device that has not registered (or a frame on a stream its device did not register)
is rejected from its topic alone, so nobody unknown can make the edge inflate a DICOM or parse a Bundle. Every
failure becomes a :class:`~edge_server.ingest.store.RejectionRow` with the
:class:`~protocols.errors.ProtocolError` reason (or ``unknown_device``, ``unregistered_stream``
(a signal frame on a stream its device did not register), ``wrong_hospital``,
``internal_error``) and a WARNING log line with the payload clipped.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass

from protocols.errors import ProtocolError
from protocols.frames import check_frame
from protocols.logsetup import clip
from protocols.messages import (
    ClinicalNote,
    DeviceRegistration,
    EhrRecord,
    ImagingStudy,
    Presence,
    from_wire,
)
from protocols.ranges import printable
from protocols.schema import SIGNAL_STREAMS
from protocols.topics import CONTROL_STREAMS, Topic

from edge_server.ingest.store import REJECTED_HEAD, Batch, DeviceRow, DocumentRow, FrameRow, PresenceRow, RejectionRow

log = logging.getLogger(__name__)

#: Distinct topics whose parse is cached (devices x streams; bad topics are never cached).
TOPIC_CACHE = 65_536

_parse_topic = functools.lru_cache(maxsize=TOPIC_CACHE)(Topic.parse)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What :meth:`Ingestor.handle` did: ``accepted`` with the stream, or the rejection reason."""

    accepted: bool
    stream: str | None = None
    reason: str | None = None


#: One shared (immutable) outcome per signal stream: the hot path allocates none.
_ACCEPTED = {stream: Outcome(True, stream) for stream in SIGNAL_STREAMS}


class Ingestor:
    """Turns deliveries into rows of a :class:`Batch`; remembers which devices registered.

    ``known`` maps device id -> registration and is updated as registrations arrive, so a
    device's frames that follow its registration in the same batch are accepted.
    """

    def __init__(self, hospital: str, known: dict[str, DeviceRow] | None = None,
                 max_payload: int = 4 * 1024 * 1024) -> None:
        self.hospital = hospital
        self.known: dict[str, DeviceRow] = dict(known or {})
        self.max_payload = max_payload

    def handle(self, topic: str, payload: bytes, batch: Batch, received_at: float) -> Outcome:
        """Validate one delivery and add its row (or rejection) to ``batch``; never raises."""
        batch.received += 1
        device_id = None
        try:
            if len(payload) > self.max_payload:
                raise ProtocolError("oversized", f"{len(payload)} bytes > {self.max_payload}")
            parsed = _parse_topic(topic)
            device_id = parsed.device_id
            if parsed.hospital != self.hospital:
                raise ProtocolError("wrong_hospital", f"{parsed.hospital!r} is not {self.hospital!r}")
            if parsed.stream in SIGNAL_STREAMS:
                return self._frame(parsed, payload, batch, received_at)
            if parsed.stream not in CONTROL_STREAMS:
                self._device(parsed)  # the sender first: nothing of an unknown device's payload is read
            msg = from_wire(parsed, payload)
            return self._accept(parsed, msg, payload, batch, received_at)
        except ProtocolError as err:
            return self._reject(err.reason, err.detail, topic, device_id, payload, batch, received_at)
        except Exception as err:  # noqa: BLE001 - one bad message must never stop ingest
            log.exception("unexpected error on %s", clip(topic))
            return self._reject("internal_error", f"{type(err).__name__}: {err}", topic, device_id,
                                payload, batch, received_at)

    def _frame(self, topic: Topic, payload: bytes, batch: Batch, now: float) -> Outcome:
        """A signal frame: the sender's checks, then those of ``from_wire``.

        The hot path (one call per frame): :func:`~protocols.frames.check_frame` validates the
        payload and returns its header, and the row keeps the wire bytes, so no
        :class:`SignalFrame` or sample array is built.
        """
        device = self._device(topic)
        if topic.stream not in device.streams:
            raise ProtocolError("unregistered_stream",
                                f"{topic.device_id!r} registered {list(device.streams)}, not {topic.stream!r}")
        if not payload:
            raise ProtocolError("truncated", "empty payload")
        head = check_frame(payload)
        if head.device_id != topic.device_id or head.stream != topic.stream:
            raise ProtocolError("topic_mismatch", f"frame device/stream {(head.device_id, head.stream)!r} differs"
                                f" from the topic's {(topic.device_id, topic.stream)!r}")
        batch.frames.append(FrameRow(head.device_id, head.stream, head.seq, device.patient_id, head.start_ts,
                                     head.sample_rate, head.n_samples, head.channels, now, bytes(payload)))
        return _ACCEPTED[topic.stream]

    def _device(self, topic: Topic) -> DeviceRow:
        """The registration of the topic's device, which must match the topic."""
        device = self.known.get(topic.device_id)
        if device is None:
            raise ProtocolError("unknown_device", f"{topic.device_id!r} has not registered")
        if device.device_class != topic.device_class:
            raise ProtocolError("topic_mismatch",
                                f"{topic.device_id!r} registered as {device.device_class!r}, topic says "
                                f"{topic.device_class!r}")
        return device

    def _accept(self, topic: Topic, msg, payload: bytes, batch: Batch, now: float) -> Outcome:
        if isinstance(msg, DeviceRegistration):
            row = DeviceRow(msg.device_id, msg.device_class, msg.patient_id, tuple(msg.streams), now, bytes(payload))
            self.known[msg.device_id] = row
            batch.devices.append(row)
            return Outcome(True, topic.stream)
        if isinstance(msg, Presence):
            batch.presence.append(PresenceRow(msg.device_id, msg.online, now))
            return Outcome(True, topic.stream)
        if isinstance(msg, ImagingStudy):
            natural = msg.sop_instance_uid or msg.study_uid
            batch.documents.append(DocumentRow("image", natural, topic.device_id, topic.stream, msg.patient_id,
                                               now, bytes(payload)))
        elif isinstance(msg, EhrRecord):
            natural = msg.bundle.get("id") if isinstance(msg.bundle.get("id"), str) else None
            natural = natural or "sha256:" + hashlib.sha256(payload).hexdigest()
            batch.documents.append(DocumentRow("ehr", natural, topic.device_id, topic.stream, msg.patient_id,
                                               now, bytes(payload)))
        elif isinstance(msg, ClinicalNote):
            batch.documents.append(DocumentRow("note", msg.note_id, topic.device_id, topic.stream, msg.patient_id,
                                               now, bytes(payload)))
        else:
            raise ProtocolError("unknown_stream", f"no store for {type(msg).__name__}")
        return Outcome(True, topic.stream)

    def _reject(self, reason: str, detail: str, topic: str, device_id: str | None, payload: bytes,
                batch: Batch, now: float) -> Outcome:
        topic, detail = printable(topic, 300), printable(detail)  # the store's TEXT is UTF-8
        log.warning("rejected %s on %s: %s (payload %s)", reason, clip(topic, 120), detail, clip(payload))
        batch.rejections.append(RejectionRow(reason, topic, device_id, detail, len(payload), now,
                                             bytes(payload[:REJECTED_HEAD])))
        return Outcome(False, reason=reason)
