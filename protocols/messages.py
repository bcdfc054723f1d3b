"""Every message a device publishes, and the one ``to_wire`` / ``from_wire`` pair for all of them.

=============== ================= ==============================================
stream          message           wire format
=============== ================= ==============================================
ecg, ppg, ...   SignalFrame       binary, see :mod:`protocols.frames`
study           ImagingStudy      DICOM Part 10 file, see :mod:`protocols.imaging`
record          EhrRecord         FHIR R4 Bundle JSON, see :mod:`protocols.fhir`
note            ClinicalNote      JSON with a version field ``v``
presence        Presence          JSON with ``v``; the agent's last will and birth
registration    DeviceRegistration JSON with ``v``; published retained
=============== ================= ==============================================

:func:`from_wire` raises :class:`protocols.errors.ProtocolError` for every bad payload,
with a short ``reason`` (``bad_version``, ``bad_checksum``, ``truncated``,
``wrong_sample_count``, ``non_finite``, ``oversized``, ``bad_json``, ``bad_dicom``,
``bad_fhir``, ``invalid``, ``topic_mismatch``, ``unknown_stream``, ``out_of_range``,
``bad_text`` ...), never a traceback. Every decoded field fits the ranges of
:mod:`protocols.ranges`, so whatever this accepts a store can hold.
"""
from __future__ import annotations

import json
import math
import time
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocols import safejson
from protocols.errors import ProtocolError
from protocols.fhir import bundle_condition, bundle_features, validate_bundle
from protocols.frames import MAX_PAYLOAD, SignalFrame, decode_frame, encode_frame
from protocols.imaging import ImagingStudy, decode_study, encode_study
from protocols.ranges import check_json_text
from protocols.schema import SIGNAL_STREAMS
from protocols.topics import DATA_STREAMS, DEVICE_CLASSES, ID_PATTERN, Topic

__all__ = [
    "ClinicalNote", "DeviceRegistration", "EhrRecord", "ImagingStudy", "MAX_PAYLOAD", "Message",
    "Presence", "SignalFrame", "JSON_VERSION", "device_class_of", "from_wire", "stream_of", "to_wire",
]

JSON_VERSION = 1
MAX_NOTE_CHARS = 20_000
_ID = ID_PATTERN.pattern


def _now() -> float:
    return time.time()


class _Json(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = JSON_VERSION


class DeviceRegistration(_Json):
    """What a device is and what it streams; published retained on its ``registration`` topic."""

    hospital: str = Field(pattern=f"^{_ID}$")
    device_id: str = Field(pattern=f"^{_ID}$")
    device_class: str
    patient_id: str = Field(pattern=f"^{_ID}$")
    streams: dict[str, float]
    model: str | None = Field(default=None, max_length=128)
    manufacturer: str | None = Field(default=None, max_length=128)
    ts: float = Field(default_factory=_now)

    @model_validator(mode="after")
    def _streams_fit_class(self) -> "DeviceRegistration":
        if self.device_class not in DEVICE_CLASSES:
            raise ValueError(f"device_class {self.device_class!r} not in {DEVICE_CLASSES}")
        allowed = DATA_STREAMS[self.device_class]
        for stream, rate in self.streams.items():
            if stream not in allowed:
                raise ValueError(f"stream {stream!r} does not belong to a {self.device_class} device")
            if not (math.isfinite(rate) and rate >= 0):
                raise ValueError(f"rate {rate!r} of {stream!r} must be finite and >= 0")
        return self


class Presence(_Json):
    """Whether a device is connected; ``online=False`` is the agent's MQTT last will."""

    device_id: str = Field(pattern=f"^{_ID}$")
    online: bool
    ts: float = Field(default_factory=_now)


class ClinicalNote(_Json):
    """A free-text note about a patient."""

    patient_id: str = Field(pattern=f"^{_ID}$")
    note_id: str = Field(pattern=f"^{_ID}$")
    text: str = Field(min_length=1, max_length=MAX_NOTE_CHARS)
    author_role: str = Field(default="physician", max_length=64)
    ts: float = Field(default_factory=_now)

    @field_validator("ts")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("ts must be finite")
        return value


class EhrRecord(BaseModel):
    """One patient's FHIR R4 Bundle (Patient, LOINC Observations, optional Condition)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    patient_id: str = Field(pattern=f"^{_ID}$")
    bundle: dict

    @model_validator(mode="after")
    def _valid_bundle(self) -> "EhrRecord":
        validate_bundle(self.bundle, self.patient_id)
        return self

    @classmethod
    def from_bundle(cls, bundle: dict) -> "EhrRecord":
        """The record of a bundle; the patient id is that of its Patient resource."""
        if not isinstance(bundle, dict) or not isinstance(bundle.get("entry"), list):
            raise ProtocolError("bad_fhir", "not a FHIR Bundle with entries")
        ids = [e.get("resource", {}).get("id") for e in bundle["entry"]
               if isinstance(e, dict) and isinstance(e.get("resource"), dict)
               and e["resource"].get("resourceType") == "Patient"]
        if len(ids) != 1 or not isinstance(ids[0], str):
            raise ProtocolError("bad_fhir", f"Bundle needs exactly one Patient with an id, has {len(ids)}")
        return cls(patient_id=ids[0], bundle=bundle)

    def features(self) -> dict[str, float]:
        """Schema feature name -> value, for the features this record carries."""
        return bundle_features(self.bundle)

    def condition(self) -> str | None:
        """The diagnosis (the training label), if the record has one."""
        return bundle_condition(self.bundle)


Message = Union[SignalFrame, ImagingStudy, EhrRecord, ClinicalNote, Presence, DeviceRegistration]

_STREAM_OF_TYPE = {ImagingStudy: "study", EhrRecord: "record", ClinicalNote: "note",
                   Presence: "presence", DeviceRegistration: "registration"}
_CLASS_OF_TYPE = {SignalFrame: "wearable", ImagingStudy: "imaging", EhrRecord: "ehr", ClinicalNote: "notes"}


def stream_of(msg: Message) -> str:
    """The topic stream ``msg`` is published on."""
    return msg.stream if isinstance(msg, SignalFrame) else _STREAM_OF_TYPE[type(msg)]


def device_class_of(msg: Message) -> str | None:
    """The device class that publishes ``msg`` (None for presence/registration: any class)."""
    if isinstance(msg, DeviceRegistration):
        return msg.device_class
    return _CLASS_OF_TYPE.get(type(msg))


def to_wire(msg: Message) -> bytes:
    """The payload bytes of ``msg``."""
    if isinstance(msg, SignalFrame):
        return encode_frame(msg)
    if isinstance(msg, ImagingStudy):
        payload = encode_study(msg)
    elif isinstance(msg, EhrRecord):
        payload = json.dumps(msg.bundle, separators=(",", ":"), allow_nan=False).encode()
    elif isinstance(msg, _Json):
        payload = msg.model_dump_json().encode()
    else:
        raise TypeError(f"not a message: {type(msg).__name__}")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD}")
    return payload


def _json(payload: bytes) -> object:
    """The parsed JSON (nesting bounded, no NaN/Infinity); every string in it UTF-8 encodable
    (``bad_text`` otherwise)."""
    value = safejson.loads(payload)
    check_json_text(value)
    return value


def _validate(model: type[BaseModel], data: object) -> BaseModel:
    if isinstance(data, dict) and "v" in data and data["v"] != JSON_VERSION:
        raise ProtocolError("bad_version", f"v={data['v']!r}, this build reads {JSON_VERSION}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError("invalid", f"{model.__name__}.{where}: {first['msg']}"[:200]) from err


def _mismatch(what: str, got: object, want: object) -> ProtocolError:
    return ProtocolError("topic_mismatch", f"{what} {got!r} differs from the topic's {want!r}")


def from_wire(topic: Topic, payload: bytes) -> Message:
    """Decode ``payload`` received on ``topic``; raises :class:`ProtocolError` when it is bad."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD}")
    if not payload:
        raise ProtocolError("truncated", "empty payload")
    stream = topic.stream
    if stream in SIGNAL_STREAMS:
        frame = decode_frame(payload)
        if frame.device_id != topic.device_id or frame.stream != stream:
            raise _mismatch("frame device/stream", (frame.device_id, frame.stream), (topic.device_id, stream))
        return frame
    if stream == "study":
        return decode_study(topic.device_id, payload)
    if stream == "record":
        try:
            return EhrRecord.from_bundle(_json(payload))
        except ValidationError as err:
            raise ProtocolError("bad_fhir", str(err.errors()[0]["msg"])[:200]) from err
    if stream == "note":
        return _validate(ClinicalNote, _json(payload))
    if stream == "presence":
        msg = _validate(Presence, _json(payload))
        if msg.device_id != topic.device_id:
            raise _mismatch("device_id", msg.device_id, topic.device_id)
        return msg
    if stream == "registration":
        msg = _validate(DeviceRegistration, _json(payload))
        if (msg.hospital, msg.device_class, msg.device_id) != (topic.hospital, topic.device_class, topic.device_id):
            raise _mismatch("registration", (msg.hospital, msg.device_class, msg.device_id),
                            (topic.hospital, topic.device_class, topic.device_id))
        return msg
    raise ProtocolError("unknown_stream", f"{stream!r}")
