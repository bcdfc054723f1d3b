"""MQTT topics as a validated type: ``iomt/{hospital}/{device_class}/{device_id}/{stream}``."""
from __future__ import annotations

import re
from dataclasses import dataclass

from protocols.errors import TopicError
from protocols.schema import SIGNAL_STREAMS

PREFIX = "iomt"
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: Device classes and the streams each may publish. Presence and registration are open to
#: every class; the wearable streams are those of protocols.schema.SIGNAL_STREAMS.
DEVICE_CLASSES: tuple[str, ...] = ("wearable", "imaging", "ehr", "notes")
CONTROL_STREAMS: tuple[str, ...] = ("presence", "registration")
DATA_STREAMS: dict[str, tuple[str, ...]] = {
    "wearable": tuple(SIGNAL_STREAMS),
    "imaging": ("study",),
    "ehr": ("record",),
    "notes": ("note",),
}
STREAMS: frozenset[str] = frozenset(
    {s for streams in DATA_STREAMS.values() for s in streams} | set(CONTROL_STREAMS))


def _check_id(kind: str, value: str) -> None:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise TopicError(f"{kind} {value!r} must match {ID_PATTERN.pattern}")


@dataclass(frozen=True, slots=True)
class Topic:
    """One device stream's topic; constructing it validates every part.

    ``stream`` must belong to ``device_class`` (a wearable cannot publish a ``study``), or be
    one of the control streams ``presence`` and ``registration``.
    """

    hospital: str
    device_class: str
    device_id: str
    stream: str

    def __post_init__(self) -> None:
        _check_id("hospital", self.hospital)
        _check_id("device_id", self.device_id)
        if self.device_class not in DEVICE_CLASSES:
            raise TopicError(f"device_class {self.device_class!r} not in {DEVICE_CLASSES}")
        if self.stream not in STREAMS:
            raise TopicError(f"unknown stream {self.stream!r}")
        if self.stream not in CONTROL_STREAMS and self.stream not in DATA_STREAMS[self.device_class]:
            raise TopicError(f"stream {self.stream!r} does not belong to device class {self.device_class!r}")

    @classmethod
    def parse(cls, text: str) -> "Topic":
        """The topic ``text`` names; raises :class:`TopicError` when it is not one of ours."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        parts = text.split("/")
        if len(parts) != 5 or parts[0] != PREFIX:
            raise TopicError(f"{text[:120]!r} is not iomt/{{hospital}}/{{device_class}}/{{device_id}}/{{stream}}")
        return cls(parts[1], parts[2], parts[3], parts[4])

    def with_stream(self, stream: str) -> "Topic":
        """The same device's topic for another stream."""
        return Topic(self.hospital, self.device_class, self.device_id, stream)

    def __str__(self) -> str:
        return f"{PREFIX}/{self.hospital}/{self.device_class}/{self.device_id}/{self.stream}"


def subscription(hospital: str) -> str:
    """The MQTT filter that matches every topic of ``hospital``."""
    _check_id("hospital", hospital)
    return f"{PREFIX}/{hospital}/#"
