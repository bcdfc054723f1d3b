"""Wire messages of encrypted inference: one party's share of a query and of its answer."""
from __future__ import annotations

import base64
import binascii

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cloud_aggregator.inference.errors import InferenceError

#: Largest tensor share accepted in one request (elements).
MAX_ELEMENTS = 64 * 3 * 224 * 224


class TensorShare(BaseModel):
    """A party's additive share of one tensor: int64 ring elements, little-endian, base64."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: list[int] = Field(max_length=8)
    data: str

    @classmethod
    def from_array(cls, arr: np.ndarray) -> TensorShare:
        arr = np.ascontiguousarray(arr, dtype="<i8")
        return cls(shape=list(arr.shape), data=base64.b64encode(arr.tobytes()).decode())

    def to_array(self) -> np.ndarray:
        if any(d < 1 for d in self.shape):
            raise InferenceError("bad_shape", f"dimensions must be positive, got {self.shape}")
        count = int(np.prod(self.shape))
        if count > MAX_ELEMENTS:
            raise InferenceError("too_large", f"{count} elements exceed the limit of {MAX_ELEMENTS}")
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise InferenceError("bad_encoding", "share data is not base64") from err
        if len(raw) != 8 * count:
            raise InferenceError("truncated_share", f"share has {len(raw)} bytes, shape {self.shape} needs {8 * count}")
        return np.frombuffer(raw, dtype="<i8").astype(np.int64).reshape(self.shape)


class InferenceRequest(BaseModel):
    """What a clinician's client sends to party i: its share of every model input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")
    model_version: int | None = Field(default=None, ge=1)
    inputs: dict[str, TensorShare] = Field(min_length=1, max_length=8)


class InferenceResponse(BaseModel):
    """Party i's share of every model output (plus public cost figures)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    party: int
    model_version: int
    outputs: dict[str, TensorShare]
    seconds: float
    rounds: int
    bytes: int
