"""Messages of secure aggregation: share uploads (binary wire format), round configs and
status, receipts and aggregation requests between coordinator, parties and hospitals.

Upload wire format (one HTTP body per party)::

    b"IMSH" | version u8 | header_len u32 LE | header JSON | payload_len u64 LE | payload

The payload is party 0's full share (``size`` int64 little-endian ring elements) or, for a
party ``j > 0``, the 32-byte seed it expands its share from.

Every header of one sharing carries the same list of share commitments
``c_i = SHA-256("iomt-share-v1" | nonce_i | payload_i)`` (one per party) and, only in party
``i``'s header, the 32-byte ``nonce_i`` that opens ``c_i``: party ``i`` checks its payload
against ``c_i`` and learns nothing about the other payloads (each ``c_j`` is hiding: its nonce
is random and never sent to party ``i``). The sharing id :meth:`UploadHeader.sharing_id` hashes
hospital, round, sample count, spec and all ``c_i``; each party's receipt names it, and the
coordinator aggregates a hospital only if every party holds the same sharing id, so parties
holding pieces of two different sharings (a retried upload that re-drew its randomness) are
detected instead of summed into garbage.
"""
from __future__ import annotations

import hashlib
import secrets
import struct
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocols.errors import ShareError
from protocols.sharing import SEED_BYTES

MAGIC = b"IMSH"
#: 2: headers carry share commitments (``nonce``, ``commitments``)
WIRE_VERSION = 2
_PREFIX = struct.Struct("<4sBI")
_LEN = struct.Struct("<Q")
MAX_HEADER = 64 * 1024
NONCE_BYTES = 32
_COMMIT_TAG = b"iomt-share-v1"
_SHARING_TAG = b"iomt-sharing-v1"
#: Default largest sample count one hospital may claim for one round (coordinator and party
#: settings ``max_samples``; the registry may declare a smaller one per hospital). FedAvg
#: weighs each update by its count, so one unbounded claim would outweigh everybody else.
MAX_SAMPLES_DEFAULT = 10_000_000
_HEX64 = r"^[0-9a-f]{64}$"

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
    #: opens ``commitments[party_index]`` (hex, 32 bytes); sent to this party only
    nonce: str = Field(pattern=_HEX64)
    #: one commitment per party, the same list in every header of this sharing
    commitments: list[str] = Field(min_length=2, max_length=64)

    @model_validator(mode="after")
    def _shape(self):
        if len(self.commitments) != self.parties:
            raise ValueError(f"{len(self.commitments)} commitments for {self.parties} parties")
        if any(len(c) != 64 or c.strip("0123456789abcdef") for c in self.commitments):
            raise ValueError("commitments must be 64 lower-case hex digits")
        return self

    def sharing_id(self) -> str:
        """Names this sharing: the same in every party's header of it, different for any other."""
        h = hashlib.sha256(_SHARING_TAG)
        for part in (self.hospital, str(self.round), str(self.parties), str(self.n_samples), str(self.size),
                     self.spec_hash, *self.commitments):
            h.update(part.encode() + b"\0")
        return h.hexdigest()


def commit_share(nonce: bytes, payload: bytes | memoryview) -> str:
    """``c = SHA-256(tag | nonce | payload)``: binds one party's payload, hides it (random nonce)."""
    h = hashlib.sha256(_COMMIT_TAG + nonce)
    h.update(payload)  # hashed in place: no copy of party 0's 8-bytes-per-parameter share
    return h.hexdigest()


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
    data = _payload_bytes(payload)
    head = header.model_dump_json().encode()
    return b"".join([_PREFIX.pack(MAGIC, WIRE_VERSION, len(head)), head, _LEN.pack(len(data)), data])


def _payload_bytes(payload: bytes | np.ndarray) -> memoryview | bytes:
    if isinstance(payload, np.ndarray):
        return memoryview(np.ascontiguousarray(payload, dtype="<i8")).cast("B")
    return bytes(payload)


def sharing_to_wire(full: np.ndarray, seeds: list[bytes], *, hospital: str, round: int, n_samples: int,
                    size: int, spec_hash: str) -> list[bytes]:
    """One upload body per party for one sharing (party 0: ``full``, party j: ``seeds[j-1]``).

    Draws a fresh nonce per party and commits to every payload (module docstring), so the
    bodies name one sharing id. Call once per (hospital, round) and resend these exact bytes
    on a retry: a second call gives a different sharing, which the parties refuse (409).
    """
    payloads = [_payload_bytes(full)] + [bytes(s) for s in seeds]
    nonces = [secrets.token_bytes(NONCE_BYTES) for _ in payloads]
    commitments = [commit_share(n, p) for n, p in zip(nonces, payloads)]
    common = dict(hospital=hospital, round=round, parties=len(payloads), n_samples=n_samples, size=size,
                  spec_hash=spec_hash, commitments=commitments)
    return [upload_to_wire(UploadHeader(party_index=i, kind="full" if i == 0 else "seed", nonce=nonces[i].hex(),
                                        **common), p)
            for i, p in enumerate(payloads)]


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
    if commit_share(bytes.fromhex(header.nonce), payload) != header.commitments[header.party_index]:
        raise ShareError("bad_commitment", f"the payload does not match commitment {header.party_index} "
                         "of its sharing")
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


class DistributedNoise(_Msg):
    """The round's distributed noise (hospital-level DP of the aggregate), as the coordinator announces it.

    Every participant clips its whole update ``Δ = θ_local - θ_global`` to L2 norm ``clip_norm``
    and adds ``N(0, σ²C²/K)`` to each coordinate (σ = ``noise_multiplier``, K = ``hospitals``),
    so the secure sum of at least K such updates carries at least ``N(0, σ²C²)`` (distributed
    DP, Kairouz et al., 2021). The round config's ``min_participants`` must be at least K: a
    round closing with fewer fails closed at the coordinator. A hospital checks both
    (:meth:`RoundConfig.distributed_noise_refusal`) instead of this model refusing them, so that
    it can say why it will not train.
    """

    #: K: each participant adds 1/K of the noise variance (None: not announced, refused)
    hospitals: int | None = Field(default=None, ge=1)
    noise_multiplier: float = Field(gt=0)
    clip_norm: float = Field(gt=0)
    #: δ of the hospital-level ε the coordinator reports for the aggregate
    delta: float = Field(default=1e-5, gt=0, lt=1)


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
    #: the largest sample count a hospital may claim this round (parties refuse more)
    max_samples: int = Field(default=MAX_SAMPLES_DEFAULT, ge=1)
    #: a round closing with fewer participants fails closed (never aggregated or published)
    min_participants: int = Field(default=1, ge=1)
    #: hospital-level DP of the aggregate, noise split among the participants (None: not used)
    distributed_noise: DistributedNoise | None = None

    def distributed_noise_refusal(self) -> str | None:
        """Why a hospital must not add only 1/K of the noise in this round (None: it may)."""
        dn = self.distributed_noise
        if dn is None or dn.hospitals is None:
            return (f"round {self.round}'s config announces no distributed noise with K (the number of hospitals "
                    "sharing it): adding 1/K of the noise needs the coordinator to announce K")
        if self.min_participants < dn.hospitals:
            return (f"round {self.round}'s config lets the round close with {self.min_participants} participants, "
                    f"fewer than K = {dn.hospitals}: the aggregate could carry less than the announced noise")
        return None


class PrivacySpent(_Msg):
    """What a hospital reports of its own privacy ledger after a round: the ε it has spent in
    all (every step of every round so far, composed) at δ, for the stated unit. A number the
    hospital vouches for, not data; the coordinator only displays it."""

    epsilon: float | None = Field(ge=0, description="None: infinite (a mechanism without noise)")
    delta: float = Field(gt=0, lt=1)
    unit: Literal["patient", "hospital"] = "patient"
    mechanism: Literal["dpsgd", "update"] = "dpsgd"
    #: the hospital's budget: the epsilon (at ``delta``) past which it refuses to train
    limit: float | None = Field(default=None, gt=0)


class RoundStatus(_Msg):
    config: RoundConfig
    state: RoundState
    participants: list[str] = Field(default_factory=list)
    denominator: int | None = None
    share_sha256: list[str | None] = Field(default_factory=list)
    detail: str = ""
    #: participant -> the sharing id every party holds from it (what was aggregated)
    commitments: dict[str, str] = Field(default_factory=dict)
    #: hospital -> why it was left out of this round (inconsistent sharing, sample count)
    excluded: dict[str, str] = Field(default_factory=dict)
    #: hospital -> the epsilon it reports having spent (its own figure, shown, never checked)
    privacy: dict[str, PrivacySpent] = Field(default_factory=dict)
    #: distributed noise: the noise multiplier the aggregate carries for its most exposed
    #: participant (protocols.dp_noise), if every participant added its announced share
    aggregate_noise_multiplier: float | None = None
    #: distributed noise: hospital-level ε at the announced δ of the aggregates of every round
    #: so far, this one included (same assumption); None without distributed noise
    aggregate_epsilon: float | None = None


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
    #: the sharing id (:meth:`UploadHeader.sharing_id`) of the share this party holds
    commitment: str


class Receipts(_Msg):
    round: int
    party_index: int
    receipts: list[Receipt]


class UploadAck(_Msg):
    round: int
    hospital: str
    party_index: int
    sha256: str
    commitment: str
    stored: bool = True


class AggregateRequest(_Msg):
    """The coordinator's instruction: aggregate exactly these hospitals' shares."""

    config: RoundConfig
    participants: list[str] = Field(min_length=1)
    denominator: int = Field(ge=1)
    #: participant -> the sharing id to aggregate; a party holding another one refuses
    commitments: dict[str, str]

    @model_validator(mode="after")
    def _named(self):
        if set(self.commitments) != set(self.participants):
            raise ValueError("commitments must name exactly the participants")
        return self


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
