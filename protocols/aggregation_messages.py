"""Messages of secure aggregation: share uploads (binary wire format), round configs and
status, receipts and aggregation requests between coordinator, parties and hospitals.

Upload wire format (one HTTP body per party)::

    b"IMSH" | version u8 | header_len u32 LE | header JSON | payload_len u64 LE | payload

The payload is party 0's full share (``size`` int64 little-endian ring elements) or, for a
party ``j > 0``, the 32-byte seed it expands its share from.
"""
from __future__ import annotations

import struct
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocols.errors import ShareError
from protocols.sharing import SEED_BYTES

MAGIC = b"IMSH"
WIRE_VERSION = 1
_PREFIX = struct.Struct("<4sBI")
_LEN = struct.Struct("<Q")
MAX_HEADER = 64 * 1024

RoundState = Literal["open", "closing", "aggregating", "done", "failed"]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UploadHeader(_Msg):
    """What a hospital says about the share it uploads to one party."""

    hospital: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=1)
    party_index: int = Field(ge=0)
    parties: int = Field(ge=2)
    kind: Literal["full", "seed"]
    n_samples: int = Field(ge=1)
    size: int = Field(ge=1)
    spec_hash: str = Field(min_length=64, max_length=64)


class Upload(BaseModel):
    """A decoded upload: header plus payload bytes (share or seed)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    header: UploadHeader
    #: a view into the received body (no copy of the 8-bytes-per-parameter share)
    payload: memoryview | bytes

    def share(self) -> np.ndarray:
        """This party's share as int64 ring elements (expanding the seed if needed)."""
        from protocols.sharing import expand_seed
        if self.header.kind == "seed":
            return expand_seed(bytes(self.payload), self.header.size)
        return np.frombuffer(self.payload, dtype="<i8").astype(np.int64, copy=False)

    def add_into(self, acc: np.ndarray, subtract: bool = False) -> np.ndarray:
        """``acc += share`` (or ``-=``) in place modulo 2^64, without materialising a seed's share."""
        from protocols.sharing import add_seed_into
        if acc.shape != (self.header.size,):
            raise ShareError("wrong_shape", f"accumulator has shape {acc.shape}, share has {self.header.size}")
        if self.header.kind == "seed":
            return add_seed_into(acc, bytes(self.payload), subtract=subtract)
        (np.subtract if subtract else np.add)(acc, np.frombuffer(self.payload, dtype="<i8"), out=acc)
        return acc


def upload_to_wire(header: UploadHeader, payload: bytes | np.ndarray) -> bytes:
    # a memoryview of the array: bytes.join copies it once, straight into the body
    data = memoryview(np.ascontiguousarray(payload, dtype="<i8")).cast("B") if isinstance(payload, np.ndarray) \
        else bytes(payload)
    head = header.model_dump_json().encode()
    return b"".join([_PREFIX.pack(MAGIC, WIRE_VERSION, len(head)), head, _LEN.pack(len(data)), data])


def upload_from_wire(data: bytes) -> Upload:
    """Decode and check an upload; :class:`ShareError` says exactly what is wrong."""
    if len(data) < _PREFIX.size:
        raise ShareError("truncated", f"{len(data)} bytes is shorter than the prefix")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ShareError("bad_magic", "not a share upload")
    if version != WIRE_VERSION:
        raise ShareError("bad_version", f"wire version {version}, expected {WIRE_VERSION}")
    if head_len > MAX_HEADER or len(data) < _PREFIX.size + head_len + _LEN.size:
        raise ShareError("truncated", "header incomplete")
    at = _PREFIX.size
    try:
        header = UploadHeader.model_validate_json(data[at:at + head_len])
    except ValidationError as err:
        raise ShareError("bad_header", str(err).splitlines()[0]) from err
    at += head_len
    (payload_len,) = _LEN.unpack_from(data, at)
    at += _LEN.size
    payload = memoryview(data)[at:]
    if len(payload) != payload_len:
        raise ShareError("truncated", f"payload has {len(payload)} bytes, header says {payload_len}")
    expected = SEED_BYTES if header.kind == "seed" else 8 * header.size
    if payload_len != expected:
        raise ShareError("truncated" if payload_len < expected else "wrong_shape",
                         f"{header.kind} payload of {payload_len} bytes, expected {expected}")
    if header.party_index >= header.parties:
        raise ShareError("bad_header", "party_index must be < parties")
    if (header.kind == "full") != (header.party_index == 0):
        raise ShareError("bad_header", "party 0 takes the full share, other parties a seed")
    return Upload(header=header, payload=payload)


class ModelInfo(_Msg):
    arch: str = "generic"
    config: dict = Field(default_factory=dict)


class ServerOptConfig(_Msg):
    """Public hyper-parameters of a server optimiser run on shares (FedAdam / FedYogi).

    ``scale`` K is a public power-of-two factor: the parties keep ``K*m`` and ``K^2*v`` so
    that squared pseudo-gradients stay well above the 2^-16 fixed-point resolution.
    """

    lr: float = Field(default=0.01, gt=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)
    scale: int = Field(default=256, ge=1, le=1 << 12)


class RoundConfig(_Msg):
    """What the coordinator fixes when it opens a round."""

    round: int = Field(ge=1)
    version: int = Field(ge=1)
    base_version: int | None = None
    deadline: float
    strategy: str = "fedavg"
    prox_mu: float = 0.0
    server_opt: ServerOptConfig | None = None
    parties: int = Field(ge=2)
    spec: list[tuple[str, list[int]]]
    spec_hash: str
    model: ModelInfo = Field(default_factory=ModelInfo)
    init_seed: int = 0


class PrivacySpent(_Msg):
    """What a hospital reports of its own privacy ledger after a round: the ε it has spent in
    all (every step of every round so far, composed) at δ, for the stated unit. A number the
    hospital vouches for, not data; the coordinator only displays it."""

    epsilon: float | None = Field(ge=0, description="None: infinite (a mechanism without noise)")
    delta: float = Field(gt=0, lt=1)
    unit: Literal["patient", "hospital"] = "patient"
    mechanism: Literal["dpsgd", "update"] = "dpsgd"


class RoundStatus(_Msg):
    config: RoundConfig
    state: RoundState
    participants: list[str] = Field(default_factory=list)
    denominator: int | None = None
    share_sha256: list[str | None] = Field(default_factory=list)
    detail: str = ""
    privacy: dict[str, PrivacySpent] = Field(default_factory=dict, description="hospital -> its reported epsilon")


class FederationStatus(_Msg):
    """Published by the coordinator: the round now in progress and the rounds planned."""

    current: RoundStatus | None
    latest_version: int | None
    rounds_done: int
    rounds_planned: int
    finished: bool
    parties: list[str]


class Receipt(_Msg):
    hospital: str
    n_samples: int
    sha256: str


class Receipts(_Msg):
    round: int
    party_index: int
    receipts: list[Receipt]


class UploadAck(_Msg):
    round: int
    hospital: str
    party_index: int
    sha256: str
    stored: bool = True


class AggregateRequest(_Msg):
    """The coordinator's instruction: aggregate exactly these hospitals' shares."""

    config: RoundConfig
    participants: list[str] = Field(min_length=1)
    denominator: int = Field(ge=1)


class AggregateResult(_Msg):
    round: int
    version: int
    party_index: int
    participants: list[str]
    denominator: int
    share_sha256: str


class ErrorBody(_Msg):
    error: str
    detail: str = ""
