"""Configuration of one device agent (``IOMT_DEVICE_*``) and of a hospital broker (``IOMT_BROKER_*``):
environment, an optional TOML file, arguments."""
from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocols.topics import DATA_STREAMS, DEVICE_CLASSES, ID_PATTERN

_ID = f"^{ID_PATTERN.pattern}$"


class AgentSettings(BaseSettings):
    """Everything a device agent needs to know. Unknown keys are an error (``extra="forbid"``); a TOML
    file, the environment and arguments combine in :func:`protocols.config.load_settings`."""

    model_config = SettingsConfigDict(env_prefix="IOMT_DEVICE_", extra="forbid")

    broker: str = "mqtt://127.0.0.1:1883"
    hospital: str = Field(pattern=_ID)
    device_id: str = Field(pattern=_ID)
    device_class: str = "wearable"
    patient_id: str = Field(default="unassigned", pattern=_ID)
    #: stream -> sample rate (Hz; 0 for event streams such as studies and notes)
    streams: dict[str, float] = Field(default_factory=dict)
    model: str | None = None
    manufacturer: str | None = None
    mqtt_version: Literal["3.1.1", "5"] = "3.1.1"
    client_id: str | None = None
    username: str | None = None
    #: Prefer IOMT_DEVICE_PASSWORD or a TOML file with tight permissions to a command line.
    password: SecretStr | None = None
    #: PEM CA bundle that signed the broker's certificate (default: the system store).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    keepalive: int = Field(default=30, ge=5, le=3600)
    #: SQLite file of the on-disk buffer; None keeps the buffer in memory (lost on a crash).
    buffer_path: Path | None = None
    #: Messages waiting in memory for the buffer; past this, publish() blocks or drops.
    queue_max: int = Field(default=10_000, ge=1)
    #: Rows the on-disk buffer may hold; past this, new messages are dropped and counted.
    buffer_max: int = Field(default=1_000_000, ge=1)
    #: QoS 1 messages handed to the client and not yet acknowledged.
    max_inflight: int = Field(default=256, ge=1, le=65_000)

    @field_validator("device_class")
    @classmethod
    def _known_class(cls, value: str) -> str:
        if value not in DEVICE_CLASSES:
            raise ValueError(f"device_class must be one of {DEVICE_CLASSES}")
        return value

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError(f"broker must look like mqtt://host:port or mqtts://host:port, got {value!r}")
        return value

    @model_validator(mode="after")
    def _streams_fit_class(self) -> "AgentSettings":
        bad = set(self.streams) - set(DATA_STREAMS[self.device_class])
        if bad:
            raise ValueError(f"streams {sorted(bad)} do not belong to a {self.device_class} device")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        tls_only = [name for name in ("ca_file", "cert_file", "key_file") if getattr(self, name) is not None]
        if self.tls_insecure:
            tls_only.append("tls_insecure")
        if tls_only and not self.tls:
            raise ValueError(f"{', '.join(tls_only)} need a TLS broker: use mqtts://host:port, not {self.broker!r}")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} is not a readable file")
        if self.password is not None and not self.username:
            raise ValueError("password without username")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker).scheme in ("mqtts", "ssl")

    @property
    def host(self) -> str:
        return urlsplit(self.broker).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.broker).port or (8883 if self.tls else 1883)


class BrokerSettings(BaseSettings):
    """``iomt broker --config broker.toml``: the keys are the command's flags with ``_`` for ``-``,
    and ``mosquitto_config`` for a Mosquitto config file used as is. Unknown keys are an error."""

    model_config = SettingsConfigDict(env_prefix="IOMT_BROKER_", extra="forbid")

    port: int = Field(default=1883, ge=0, le=65535)
    host: str = "127.0.0.1"
    embedded: bool = False
    data_dir: Path | None = None
    user: str | None = None
    autosave_changes: int | None = None
    #: A Mosquitto config file run as is (the ``--config FILE`` that is not ``.toml``).
    mosquitto_config: Path | None = None
    hospital: str | None = None
    passwords: Path | None = None
    edge_user: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    allow_anonymous: bool = False
    allow_plain: bool = False
