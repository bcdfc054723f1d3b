"""The MPC group's jobs: their kinds, the header party 0 broadcasts, and one table of status codes."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class JobKind(str, enum.Enum):
    """What party 0 tells the group to do next (the header's ``kind``)."""

    #: encrypted inference on a clinician's query (cloud_aggregator.inference.handler)
    INFER = "infer"
    #: FedAdam/FedYogi step on the summed shares (cloud_aggregator.mpc.server_opt)
    SERVER_UPDATE = "server_update"
    #: heartbeat: nothing queued at party 0
    NOOP = "noop"
    #: party 0 is shutting down: every worker leaves its loop
    STOP = "stop"


class JobStatus(str, enum.Enum):
    """Why a job ended: the reason (the enum's value, the ``reason`` of ``InferenceError`` and of
    the HTTP error body), the integer every party contributes to the status agreement before
    computing (``wire``; None for reasons found outside that agreement) and the HTTP status
    a party's router answers with."""

    def __new__(cls, reason: str, wire: int | None, http: int) -> JobStatus:
        member = str.__new__(cls, reason)
        member._value_ = reason
        member.wire = wire
        member.http = http
        return member

    OK = ("ok", 0, 200)
    MISSING_SHARE = ("missing_share", 1, 409)
    BAD_SHAPE = ("bad_shape", 2, 400)
    NO_MODEL = ("no_model", 3, 404)
    CLIENT_MISMATCH = ("client_mismatch", 4, 409)
    BAD_INPUT = ("bad_input", 5, 400)
    MPC_UNAVAILABLE = ("mpc_unavailable", None, 503)
    PARTY_UNREACHABLE = ("party_unreachable", None, 503)
    TIMEOUT = ("timeout", None, 504)
    NOT_SCHEDULED = ("not_scheduled", None, 504)
    DUPLICATE_REQUEST = ("duplicate_request", None, 409)
    #: the served version's weights let activations leave the approximations' ranges
    MODEL_OUT_OF_RANGE = ("model_out_of_range", None, 422)

    @classmethod
    def from_wire(cls, wire: int) -> JobStatus:
        """The status a party reported in the agreement (unknown integers: ``bad_input``)."""
        return _BY_WIRE.get(wire, cls.BAD_INPUT)


_BY_WIRE = {s.wire: s for s in JobStatus if s.wire is not None}


def http_status(reason: str) -> int:
    """HTTP status for a refusal reason; reasons outside :class:`JobStatus` are the request's fault (400)."""
    try:
        return JobStatus(reason).http
    except ValueError:
        return 400


@dataclass
class Job:
    """One party's share of a job, handed to its worker (crosses a process boundary by pickle)."""

    request_id: str
    client: str
    version: int | None
    inputs: dict[str, np.ndarray]
    received: float = field(default_factory=time.monotonic)
    kind: JobKind = JobKind.INFER
    #: kind-specific: for ``SERVER_UPDATE``, ``public`` (what every party must agree on) and ``spec``
    params: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobHeader:
    """What party 0 broadcasts before each job; every party then acts on the same header.

    It crosses the group as a plain dict (:meth:`to_wire`): CrypTen's ``broadcast_obj``
    unpickles only builtin types."""

    kind: JobKind
    id: str | None = None
    client: str | None = None
    #: INFER: the global model version (party 0 resolves "latest" before broadcasting)
    version: int | None = None
    #: INFER: input name -> shape, as party 0 received them
    shapes: dict[str, list[int]] | None = None
    #: SERVER_UPDATE: the public parameters of the step
    public: dict | None = None

    @classmethod
    def for_job(cls, job: Job, latest: Callable[[], int | None]) -> JobHeader:
        """The header of ``job``; ``latest()`` gives the version when the job names none."""
        if job.kind != JobKind.INFER:
            return cls(kind=job.kind, id=job.request_id, client=job.client, public=job.params.get("public"))
        return cls(kind=JobKind.INFER, id=job.request_id, client=job.client,
                   version=job.version if job.version is not None else latest(),
                   shapes={k: list(v.shape) for k, v in job.inputs.items()})

    def to_wire(self) -> dict:
        """The header as builtin types, for ``broadcast_obj``."""
        wire = {"kind": self.kind.value}
        for name in ("id", "client", "version", "shapes", "public"):
            value = getattr(self, name)
            if value is not None:
                wire[name] = value
        return wire

    @classmethod
    def from_wire(cls, wire: dict) -> JobHeader:
        """The header party 0 broadcast (unknown kinds raise ``ValueError``)."""
        return cls(kind=JobKind(wire["kind"]), id=wire.get("id"), client=wire.get("client"),
                   version=wire.get("version"), shapes=wire.get("shapes"), public=wire.get("public"))
