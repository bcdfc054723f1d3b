"""Signal frames: one device's multichannel samples over one interval, and their binary wire format.

Layout (little-endian), version 1::

    magic  "IMSF"        4 bytes
    version              u8
    seq                  u64    sequence number, per device and stream; < 2**63
    start_ts             f64    unix seconds of the first sample
    sample_rate          f64    Hz
    channels             u16
    dtype code           u8     1 = float32, 2 = int16
    n_samples            u32    rows; the sample block holds n_samples * channels values
    len(device_id)       u8
    len(stream)          u8
    device_id, stream    ASCII
    samples              n_samples * channels values, row-major (sample, channel)
    crc32                u32    zlib.crc32 of every byte before it

``seq`` is an unsigned 64-bit field, but values of 2**63 and above are refused
(``out_of_range``): stores keep it in a signed 64-bit integer (see :mod:`protocols.ranges`).

Decoding is a handful of ``struct`` calls, one numpy view of the payload and one
finiteness pass: no per-sample Python and no second pydantic pass over fields the decoder
has already checked, so one core decodes tens of thousands of frames per second.
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from protocols.errors import ProtocolError
from protocols.ranges import MAX_INT
from protocols.schema import SIGNAL_STREAMS
from protocols.topics import ID_PATTERN

MAGIC = b"IMSF"
FRAME_VERSION = 1
#: Largest payload any message may have on the wire (bytes); larger ones are refused unread.
MAX_PAYLOAD = 4 * 1024 * 1024
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "float32": (1, np.dtype("<f4")),
    "int16": (2, np.dtype("<i2")),
}
_BY_CODE: dict[int, tuple[str, np.dtype]] = {code: (name, dt) for name, (code, dt) in DTYPES.items()}
_HEADER = struct.Struct("<4sBQddHBIBB")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
_MIN_SIZE = HEADER_SIZE + _CRC.size
_FLOAT32_CODE = DTYPES["float32"][0]
_ID_MATCH = ID_PATTERN.fullmatch
_dot = np.dot



def _check(device_id: str, stream: str, seq: int, start_ts: float, sample_rate: float,
           channels: int, dtype: str, samples: np.ndarray) -> None:
    """Raise :class:`ProtocolError` unless the fields make a valid frame."""
    if not isinstance(device_id, str) or not ID_PATTERN.fullmatch(device_id):
        raise ProtocolError("bad_field", f"device_id {device_id!r}")
    if stream not in SIGNAL_STREAMS:
        raise ProtocolError("unknown_stream", f"{stream!r} is not a signal stream")
    if not (isinstance(seq, int) and 0 <= seq <= MAX_INT):
        raise ProtocolError("out_of_range", f"seq {seq} is not in [0, 2**63)")
    if not math.isfinite(start_ts) or not (math.isfinite(sample_rate) and 0 < sample_rate <= 100_000):
        raise ProtocolError("bad_field", f"start_ts {start_ts} / sample_rate {sample_rate}")
    if channels != SIGNAL_STREAMS[stream][0]:
        raise ProtocolError("wrong_channels", f"{stream} has {SIGNAL_STREAMS[stream][0]} channels, got {channels}")
    if dtype not in DTYPES:
        raise ProtocolError("bad_dtype", f"{dtype!r} not in {tuple(DTYPES)}")
    if not isinstance(samples, np.ndarray) or samples.ndim != 2 or samples.shape[1] != channels:
        shape = getattr(samples, "shape", None)
        raise ProtocolError("wrong_shape", f"samples must be (n, {channels}), got {shape}")
    if samples.shape[0] < 1:
        raise ProtocolError("wrong_sample_count", "a frame needs at least one sample")
    if samples.dtype != DTYPES[dtype][1]:
        raise ProtocolError("bad_dtype", f"samples are {samples.dtype}, frame says {dtype}")
    if dtype == "float32" and not np.isfinite(samples).all():
        raise ProtocolError("non_finite", "samples contain NaN or inf")


class SignalFrame(BaseModel):
    """``samples`` has shape ``(n, channels)`` and the dtype named by ``dtype``.

    Build one with :meth:`build` to convert samples from any numeric array; the plain
    constructor expects them already in the frame's dtype (little-endian).
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")

    device_id: str
    stream: str
    seq: int
    start_ts: float
    sample_rate: float
    channels: int
    dtype: str = "float32"
    samples: np.ndarray

    @model_validator(mode="after")
    def _valid(self) -> "SignalFrame":
        _check(self.device_id, self.stream, self.seq, self.start_ts, self.sample_rate,
               self.channels, self.dtype, self.samples)
        return self

    @classmethod
    def build(cls, device_id: str, stream: str, seq: int, start_ts: float, sample_rate: float,
              samples: np.ndarray, dtype: str = "float32") -> "SignalFrame":
        """A frame from any array of shape ``(n,)`` or ``(n, channels)``."""
        arr = np.asarray(samples)
        if arr.ndim == 1:
            arr = arr[:, None]
        if dtype not in DTYPES:
            raise ProtocolError("bad_dtype", f"{dtype!r} not in {tuple(DTYPES)}")
        arr = np.ascontiguousarray(arr, dtype=DTYPES[dtype][1])
        return cls(device_id=device_id, stream=stream, seq=seq, start_ts=start_ts,
                   sample_rate=sample_rate, channels=arr.shape[1], dtype=dtype, samples=arr)

    @classmethod
    def _trusted(cls, device_id: str, stream: str, seq: int, start_ts: float, sample_rate: float,
                 channels: int, dtype: str, samples: np.ndarray) -> "SignalFrame":
        """A frame from fields :func:`decode_frame` has already checked, without validation.

        What :meth:`pydantic.BaseModel.model_construct` does, minus its per-field alias and
        default lookups (its largest cost on the decode path); tests/protocols compare the
        result with a validated frame field by field.
        """
        m = cls.__new__(cls)
        _set = object.__setattr__
        _set(m, "__dict__", {"device_id": device_id, "stream": stream, "seq": seq, "start_ts": start_ts,
                             "sample_rate": sample_rate, "channels": channels, "dtype": dtype,
                             "samples": samples})
        _set(m, "__pydantic_fields_set__", set(_FIELDS))
        _set(m, "__pydantic_extra__", None)
        _set(m, "__pydantic_private__", None)
        return m

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])

    def timestamps(self) -> np.ndarray:
        """Unix time of every sample."""
        return self.start_ts + np.arange(self.n_samples) / self.sample_rate


_FIELDS = tuple(SignalFrame.model_fields)


def pack_raw(device_id: str, stream: str, seq: int, start_ts: float, sample_rate: float, channels: int,
             dtype_code: int, n_samples: int, sample_bytes: bytes, version: int = FRAME_VERSION,
             crc: int | None = None) -> bytes:
    """Pack header fields and sample bytes as given, without validation.

    For :func:`encode_frame` and for fault-injection tests that must forge malformed
    frames (wrong counts, versions, checksums) that a buggy device might send.
    """
    dev, st = device_id.encode("ascii"), stream.encode("ascii")
    body = _HEADER.pack(MAGIC, version, seq, start_ts, sample_rate, channels, dtype_code, n_samples,
                        len(dev), len(st)) + dev + st + sample_bytes
    return body + _CRC.pack(zlib.crc32(body) if crc is None else crc)


def encode_frame(frame: SignalFrame) -> bytes:
    """The wire bytes of ``frame``."""
    code, dt = DTYPES[frame.dtype]
    data = np.ascontiguousarray(frame.samples, dtype=dt).tobytes()
    payload = pack_raw(frame.device_id, frame.stream, frame.seq, frame.start_ts, frame.sample_rate,
                       frame.channels, code, frame.n_samples, data)
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD}")
    return payload


class FrameHeader(NamedTuple):
    """The checked header of a valid frame (what :func:`check_frame` returns)."""

    device_id: str
    stream: str
    seq: int
    start_ts: float
    sample_rate: float
    channels: int
    dtype: str
    n_samples: int


def _all_finite(values: np.ndarray) -> bool:
    """Whether a 1-D float32 array holds no NaN or inf.

    The sum of squares is one BLAS call without a temporary array; it is NaN or inf whenever
    a value is, and finite values only overflow it when they exceed ~1e19, where the exact
    ``isfinite`` pass decides. So the answer is exact and the common case is cheap.
    """
    return math.isfinite(_dot(values, values)) or bool(np.isfinite(values).all())


def _decode(payload: bytes) -> tuple[FrameHeader, np.ndarray, int]:
    """Every check of a frame; ``(header, flat sample view, sample offset)`` when it is valid."""
    size = len(payload)
    if size > MAX_PAYLOAD:
        raise ProtocolError("oversized", f"{size} bytes > {MAX_PAYLOAD}")
    if size < 5:
        raise ProtocolError("truncated", f"{size} bytes")
    if payload[:4] != MAGIC:
        raise ProtocolError("bad_magic", f"starts with {bytes(payload[:4])!r}")
    if payload[4] != FRAME_VERSION:
        raise ProtocolError("bad_version", f"version {payload[4]}, this build reads {FRAME_VERSION}")
    if size < _MIN_SIZE:
        raise ProtocolError("truncated", f"{size} bytes < header {_MIN_SIZE}")
    (crc,) = _CRC.unpack_from(payload, size - 4)
    if zlib.crc32(memoryview(payload)[: size - 4]) != crc:
        raise ProtocolError("bad_checksum", "crc32 mismatch")
    (_, _, seq, start_ts, rate, channels, code, n, len_dev, len_st) = _HEADER.unpack_from(payload)
    pos = HEADER_SIZE + len_dev + len_st
    if pos > size - 4:
        raise ProtocolError("truncated", "ids run past the end of the frame")
    try:
        device_id = payload[HEADER_SIZE:HEADER_SIZE + len_dev].decode("ascii")
        stream = payload[HEADER_SIZE + len_dev:pos].decode("ascii")
    except UnicodeDecodeError as err:
        raise ProtocolError("bad_field", "ids are not ASCII") from err
    entry = _BY_CODE.get(code)
    if entry is None:
        raise ProtocolError("bad_dtype", f"dtype code {code}")
    dtype, dt = entry
    nbytes = size - 4 - pos
    if nbytes != n * channels * dt.itemsize:
        raise ProtocolError("wrong_sample_count",
                            f"header says {n}x{channels} {dtype}, block holds {nbytes} bytes")
    # The checks of _check() that the layout does not already guarantee, in its order.
    if not _ID_MATCH(device_id):
        raise ProtocolError("bad_field", f"device_id {device_id!r}")
    spec = SIGNAL_STREAMS.get(stream)
    if spec is None:
        raise ProtocolError("unknown_stream", f"{stream!r} is not a signal stream")
    if seq > MAX_INT:
        raise ProtocolError("out_of_range", f"seq {seq} is not in [0, 2**63)")
    if not math.isfinite(start_ts) or not (math.isfinite(rate) and 0 < rate <= 100_000):
        raise ProtocolError("bad_field", f"start_ts {start_ts} / sample_rate {rate}")
    if channels != spec[0]:
        raise ProtocolError("wrong_channels", f"{stream} has {spec[0]} channels, got {channels}")
    if n < 1:
        raise ProtocolError("wrong_sample_count", "a frame needs at least one sample")
    flat = np.ndarray((n * channels,), dt, payload, pos)  # a view: one call, no copy
    if code == _FLOAT32_CODE and not _all_finite(flat):
        raise ProtocolError("non_finite", "samples contain NaN or inf")
    return FrameHeader(device_id, stream, seq, start_ts, rate, channels, dtype, n), flat, pos


def check_frame(payload: bytes) -> FrameHeader:
    """The header of the frame in ``payload`` after every check :func:`decode_frame` makes.

    For consumers that keep the wire bytes as they are (the edge's ingest) and need the
    fields, not a :class:`SignalFrame` with its samples.
    """
    return _decode(payload)[0]


def decode_frame(payload: bytes) -> SignalFrame:
    """The frame in ``payload``; raises :class:`ProtocolError` with a reason when malformed.

    The returned samples are a read-only view of ``payload``. Every check of
    :class:`SignalFrame` runs, in the same order, except those the layout makes true by
    construction (2-D shape with ``channels`` columns, dtype matching its code, ``seq``
    not negative); the frame is then built without a second validation pass.
    """
    head, flat, _ = _decode(payload)
    return SignalFrame._trusted(head.device_id, head.stream, head.seq, head.start_ts, head.sample_rate,
                                head.channels, head.dtype, flat.reshape(head.n_samples, head.channels))
