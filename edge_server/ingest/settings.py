"""Configuration of one hospital's edge daemon (pydantic-settings: TOML file, env, CLI)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocols.config import load_settings as _load


class InfluxSettings(BaseSettings):
    """Optional time-series sink (InfluxDB 2 write API); off unless ``url`` is set and enabled."""

    model_config = SettingsConfigDict(env_prefix="IOMT_EDGE_INFLUX_", extra="forbid")

    enabled: bool = False
    url: str = ""
    token: str = ""
    org: str = "iomt"
    bucket: str = "iomt"
    batch_size: int = Field(1000, ge=1)
    flush_interval_ms: int = Field(1000, ge=10)
    max_retries: int = Field(5, ge=0)
    retry_interval_ms: int = Field(500, ge=1)


class EdgeSettings(BaseSettings):
    """Everything ``iomt edge run`` needs; every field can come from ``IOMT_EDGE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="IOMT_EDGE_", extra="forbid")

    hospital: str
    broker: str = "mqtt://127.0.0.1:1883"
    data_dir: Path
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    #: A client certificate and its key (a broker started with ``iomt broker --client-ca``).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Commit (and then acknowledge) after this many messages ...
    batch_max: int = Field(500, ge=1)
    #: ... or once the oldest uncommitted message is this old.
    batch_ms: float = Field(25.0, gt=0)
    #: Per-connection cap on unacknowledged QoS 1 deliveries (MQTT 5 Receive Maximum).
    receive_maximum: int = Field(2000, ge=1, le=65535)
    #: Seconds the broker keeps our session (subscription + queued messages) while we are away.
    session_expiry_s: int = Field(7 * 24 * 3600, ge=1)
    #: Payloads larger than this are rejected unread (reason ``oversized``).
    max_payload: int = Field(4 * 1024 * 1024, ge=1024)
    #: SQLite ``synchronous``: NORMAL survives a killed process; FULL also a power cut.
    sqlite_synchronous: str = "NORMAL"
    #: Seconds between rebuilds of preprocessed patient records while running (0 = only at exit).
    preprocess_interval_s: float = Field(30.0, ge=0)
    #: ``module:function`` taking a note's text and returning a vector; empty = raw note only.
    text_embedder: str = ""
    client_id: str | None = None
    #: "5" (session expiry, receive maximum) or "3.1.1" (clean_session=False; cheaper to parse in paho).
    mqtt_version: Literal["5", "3.1.1"] = "5"
    influx: InfluxSettings = Field(default_factory=InfluxSettings)

    @field_validator("sqlite_synchronous")
    @classmethod
    def _sync(cls, value: str) -> str:
        if value.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"sqlite_synchronous {value!r} not in OFF/NORMAL/FULL/EXTRA")
        return value.upper()

    @model_validator(mode="after")
    def _client_cert(self) -> "EdgeSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        url = urlparse(value if "://" in value else f"mqtt://{value}")
        if url.scheme not in {"mqtt", "mqtts", "tcp", "ssl"} or not url.hostname:
            raise ValueError(f"broker {value!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
        return url.geturl()

    def broker_address(self) -> tuple[str, int, bool]:
        """(host, port, tls) of the broker URL."""
        url = urlparse(self.broker)
        tls = url.scheme in {"mqtts", "ssl"}
        return url.hostname or "127.0.0.1", url.port or (8883 if tls else 1883), tls

    def stable_client_id(self) -> str:
        """The client id edges used before it was kept in the store (still used by those stores).

        It is derived from the hospital and the resolved data directory, public facts: new
        stores get a random one (:func:`edge_server.ingest.daemon.session_client_id`).
        """
        if self.client_id:
            return self.client_id
        digest = hashlib.sha256(str(Path(self.data_dir).resolve()).encode()).hexdigest()[:12]
        return f"iomt-edge-{self.hospital}-{digest}"


class FederateSettings(BaseSettings):
    """``iomt edge federate``: one hospital's part in the federation's rounds (env ``IOMT_FEDERATE_*``).

    The keys are the command's long flags with ``_`` for ``-``; ``--write-model`` and ``--json``
    are one-shot and stay on the command line.
    """

    model_config = SettingsConfigDict(env_prefix="IOMT_FEDERATE_", extra="forbid")

    data_dir: Path | None = None
    key_file: Path | None = None
    #: Coordinator base URL.
    coordinator: str | None = None
    #: The federation's CA certificate (verifies the cloud services) and its revocation list.
    tls_ca: Path | None = None
    tls_crl: Path | None = None
    #: This hospital's own TLS certificate and key (`iomt keys init` here, `iomt ca sign` at the
    #: operator), presented to the parties and the coordinator, which require them (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    epochs: int = Field(1, ge=1)
    seed: int = 0
    #: ModelConfig JSON file (``--model-config``; pydantic reserves the name ``model_config``).
    model_config_file: Path | None = None
    image_encoder: Literal["cnn", "resnet18", "alexnet"] = "cnn"
    text_encoder: Literal["bag", "transformer", "minilm"] = "bag"
    fusion: Literal["attention", "quadratic"] = "attention"
    #: Differential privacy, as in ``--dp``/``--epsilon``/... (edge_server.training.dp_options).
    dp: Literal["sgd", "update", "off"] = "sgd"
    epsilon: float | None = 8.0  # = dp_options.DEFAULT_EPSILON (not imported: it would load torch)
    delta: float = 1e-5  # = dp_options.DEFAULT_DELTA
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    epsilon_budget: float | None = None
    #: Seconds to keep retrying an unreachable coordinator or party (refused, DNS, timeout, 502/503/504)
    #: before exiting with code 4; 0 = fail at once.
    retry_for: float = Field(600.0, ge=0)
    #: First pause between retries (seconds); it doubles per try, with full jitter ...
    retry_first: float = Field(1.0, gt=0)
    #: ... up to this many seconds.
    retry_max: float = Field(30.0, gt=0)

    #: Refuse rounds whose config does not announce distributed noise with K (``--distributed-noise``).
    distributed_noise: bool = False

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("tls_cert needs tls_ca (the federation's CA)")
        return self


def load_settings(config: Path | None = None, **overrides) -> EdgeSettings:
    """Settings from the TOML file ``config``, the environment and ``overrides`` (CLI flags; None
    means not given), in the precedence of :func:`protocols.config.load_settings`."""
    return _load(EdgeSettings, config, overrides)
