"""Model state <-> one flat vector, with a spec of parameter names and shapes, and a hash.

A state is a ``dict[str, np.ndarray]`` (a PyTorch ``state_dict`` converted to numpy). The
spec (``[[name, shape], ...]`` in the state's order) travels with every upload so that a
party can refuse an update of the wrong architecture before storing it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np

from protocols.errors import ShareError

Spec = list[tuple[str, tuple[int, ...]]]


def spec_of(state: Mapping[str, np.ndarray]) -> Spec:
    """The spec of ``state``: its names and shapes, in its order."""
    return [(name, tuple(int(d) for d in np.shape(value))) for name, value in state.items()]


def normalise_spec(spec: Sequence) -> Spec:
    """A spec from JSON (lists) or Python (tuples), validated."""
    out: Spec = []
    seen = set()
    for item in spec:
        name, shape = item
        if not isinstance(name, str) or name in seen:
            raise ShareError("bad_spec", f"bad or duplicate parameter name {name!r}")
        seen.add(name)
        out.append((name, tuple(int(d) for d in shape)))
    return out


def spec_size(spec: Spec) -> int:
    """Number of scalar parameters the spec describes."""
    return int(sum(int(np.prod(shape, dtype=np.int64)) for _, shape in spec))


def spec_hash(spec: Spec) -> str:
    """sha256 (hex) of the canonical JSON of a spec."""
    canon = json.dumps([[n, list(s)] for n, s in normalise_spec(spec)], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def flatten(state: Mapping[str, np.ndarray], spec: Spec, dtype=np.float64) -> np.ndarray:
    """Concatenate ``state`` in spec order into one vector; shapes must match exactly."""
    parts = []
    for name, shape in spec:
        if name not in state:
            raise ShareError("wrong_shape", f"parameter {name!r} missing from state")
        value = np.asarray(state[name])
        if tuple(value.shape) != tuple(shape):
            raise ShareError("wrong_shape", f"{name}: shape {value.shape} != {tuple(shape)}")
        parts.append(value.astype(dtype, copy=False).reshape(-1))
    extra = set(state) - {n for n, _ in spec}
    if extra:
        raise ShareError("wrong_shape", f"parameters not in spec: {sorted(extra)[:5]}")
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def unflatten(vector: np.ndarray, spec: Spec) -> dict[str, np.ndarray]:
    """Split a flat vector back into named arrays (views into ``vector``)."""
    if vector.ndim != 1 or vector.size != spec_size(spec):
        raise ShareError("wrong_shape", f"vector of {vector.size} values does not fit spec of {spec_size(spec)}")
    out, at = {}, 0
    for name, shape in spec:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = vector[at:at + size].reshape(shape)
        at += size
    return out


def state_sha256(state: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex) of a state: names, shapes, dtypes and bytes, in the state's order."""
    h = hashlib.sha256()
    for name, value in state.items():
        arr = np.ascontiguousarray(value)
        h.update(json.dumps([name, list(arr.shape), arr.dtype.str]).encode())
        h.update(arr.tobytes())
    return h.hexdigest()
