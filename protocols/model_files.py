"""The two JSON files that describe a model across processes: a party's global-model
``meta.json`` and the coordinator's ``--model`` file.

:class:`GlobalModelMeta` is written by a party when it publishes a global version
(``D/global/v{version:06d}/meta.json``, served at ``GET /global/{version}/meta``) and read by
the party's own inference and server-optimiser jobs and by every hospital's federated client.
Readers ignore keys they do not know (``extra="ignore"``): a newer party may add one without
breaking an older hospital, and stores written before a key existed still load.

:class:`CoordinatorModelFile` is written by ``iomt edge federate --write-model`` and given to
the coordinator as ``--model``. It is user-supplied configuration, so unknown keys are refused
(``extra="forbid"``): a typo such as ``init_sede`` fails loudly instead of silently using 0.

Both keep the JSON keys of the dicts they replace, so existing files load unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocols.aggregation_messages import ModelInfo
from protocols.errors import ConfigError
from protocols.params import Spec, normalise_spec

__all__ = ["CoordinatorModelFile", "GlobalModelMeta"]

#: ``[[name, [dim, ...]], ...]``: a parameter spec as JSON holds it
SpecJSON = list[tuple[str, list[int]]]


class GlobalModelMeta(BaseModel):
    """What one party says about a global version it publishes (its ``meta.json``).

    The model is ``S / denominator`` where ``S`` is the sum of the parties' shares.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = Field(ge=1)
    #: 0 for a model published outside federated rounds (cloud_aggregator.inference.publish)
    round: int = Field(ge=0)
    parties: int = Field(ge=2)
    party_index: int = Field(ge=0)
    #: the divisor of the shared sum (the round's total sample count; 1 when a server
    #: optimiser stored theta itself)
    denominator: int = Field(ge=1)
    participants: list[str]
    spec: SpecJSON
    model: ModelInfo = Field(default_factory=ModelInfo)
    strategy: str = "fedavg"
    #: what the server optimiser did (its settings and MPC cost); absent without one
    server_opt: dict[str, Any] | None = None

    def param_spec(self) -> Spec:
        """The spec as ``[(name, shape tuple)]``, validated."""
        return normalise_spec(self.spec)

    def to_json(self) -> str:
        """The ``meta.json`` text: the same keys (and layout) as before this type existed."""
        data = self.model_dump(mode="json")
        if data["server_opt"] is None:
            del data["server_opt"]
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> GlobalModelMeta:
        """Parse a ``meta.json``; :class:`pydantic.ValidationError` if it is malformed."""
        return cls.model_validate_json(text)


class CoordinatorModelFile(BaseModel):
    """The coordinator's ``--model`` file: architecture, config, parameter spec, initial seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "generic"
    config: dict[str, Any] = Field(default_factory=dict)
    spec: SpecJSON = Field(min_length=1)
    #: seed every hospital initialises the first round's model from
    init_seed: int = 0

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(arch=self.arch, config=self.config)

    def param_spec(self) -> Spec:
        return normalise_spec(self.spec)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: str | Path) -> CoordinatorModelFile:
        """Load a model file; :class:`ConfigError` naming the file if it is missing or malformed."""
        try:
            return cls.model_validate_json(Path(path).read_bytes())
        except (OSError, ValidationError) as err:
            raise ConfigError(f"model file {path}: {err}") from err
