"""Settings of the cloud services: one party (:class:`PartySettings`), the coordinator
(:class:`CoordinatorSettings`) and the triples provider (:class:`TriplesSettings`). Values come
from CLI flags, ``IOMT_PARTY_*`` / ``IOMT_COORD_*`` / ``IOMT_TRIPLES_*`` environment variables,
a ``--config`` TOML file (protocols.config), or keyword arguments in tests; unknown keys fail."""
from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocols.aggregation_messages import MAX_SAMPLES_DEFAULT


class _HTTP(BaseSettings):
    #: Longest token lifetime (exp - iat, seconds) accepted, plus 30 s of clock tolerance.
    max_token_ttl: float = Field(default=600.0, gt=0, le=86400)
    #: Largest JSON request body (bytes) on routes without a larger limit of their own.
    max_body_bytes: int = Field(default=4 << 20, ge=1024)


class _TLS(_HTTP):
    #: This service's own certificate and key (PEM; the key made on this host by `iomt keys
    #: init`, the certificate signed by the federation's CA). Served to clients, and presented
    #: as client certificate to the services this one calls (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: The federation's CA certificate: every client must present a certificate it signed,
    #: and the services this one calls are verified against it.
    tls_ca: Path | None = None
    #: The CA's revocation list (``crl.pem``); re-read when it changes.
    tls_crl: Path | None = None
    #: Development only: without TLS material, serve plain HTTP (logged at WARNING). Without
    #: TLS material and without this, the service refuses to start (exit 2).
    insecure_http: bool = False

    @model_validator(mode="after")
    def _pair(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("tls_cert needs tls_ca: clients are verified against the federation's CA (mutual TLS)")
        return self

    def client_tls(self):
        """httpx's ``verify=`` for this service's calls: the CA (and CRL), presenting its own certificate."""
        from protocols.tls_client import client_context
        return client_context(self.tls_ca, self.tls_cert, self.tls_key, self.tls_crl)


class PartySettings(_TLS):
    """One non-colluding party: where it stores shares and whom it trusts."""

    model_config = SettingsConfigDict(env_prefix="IOMT_PARTY_", extra="forbid")

    index: int = Field(ge=0)
    parties: int = Field(ge=2)
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8800
    #: Principal registry (public keys, roles, revocations), see protocols.auth.Registry.
    registry: Path
    #: This party's own Ed25519 key file (to call the coordinator).
    key_file: Path | None = None
    #: Base URL of the coordinator, which publishes round configs.
    coordinator_url: str | None = None
    #: host:port of torch.distributed's rendezvous for encrypted inference (CrypTen).
    mpc_master: str | None = None
    #: This party's MPC address (its gloo and rendezvous listeners bind here only); default:
    #: the first address of ``mpc_interface``, else the master's host on loopback / party 0.
    mpc_address: str | None = None
    #: Interface of the MPC link; off loopback it must be WireGuard (mpc.mpclink).
    mpc_interface: str | None = None
    #: Development only: join the MPC group over an unprotected link (logged at WARNING).
    mpc_insecure: bool = False
    # The three below also accept their older names IOMT_MPC_PROVIDER, IOMT_MPC_DEVICE and
    # IOMT_MPC_REQUEST_TIMEOUT (IOMT_PARTY_* wins when both are set).
    #: Beaver triples from ``TTP`` (a separate ``iomt cloud triples`` process) or ``TFP``
    #: (each party deals its own: development on one host only).
    mpc_provider: Literal["TTP", "TFP"] = Field(default="TTP", validation_alias=AliasChoices(
        "mpc_provider", "IOMT_PARTY_MPC_PROVIDER", "IOMT_MPC_PROVIDER"))
    #: Where the MPC worker computes: ``cpu`` or ``cuda``.
    mpc_device: str = Field(default="cpu", validation_alias=AliasChoices(
        "mpc_device", "IOMT_PARTY_MPC_DEVICE", "IOMT_MPC_DEVICE"))
    #: Seconds an MPC request may compute before it fails and the group restarts; large
    #: batches of big models on CPUs need more.
    mpc_request_timeout: float = Field(default=120.0, gt=0, validation_alias=AliasChoices(
        "mpc_request_timeout", "IOMT_PARTY_MPC_REQUEST_TIMEOUT", "IOMT_MPC_REQUEST_TIMEOUT"))
    #: Largest share upload body in bytes (enforced while the body streams in).
    max_upload_bytes: int = Field(default=1 << 31, ge=1024)
    #: Largest encrypted-inference request body in bytes (base64 shares of the inputs).
    max_inference_bytes: int = Field(default=256 << 20, ge=1024)
    #: Most samples one hospital may claim per round (FedAvg weight); larger claims are refused.
    max_samples: int = Field(default=MAX_SAMPLES_DEFAULT, ge=1)
    #: Plain-HTTP port serving Prometheus metrics (cloud_aggregator.metrics: counts, durations and
    #: states, nothing secret); None: off, 0: any free port. deploy/ uses 9101.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: Address of the metrics port: loopback, or the management interface that the firewall
    #: opens to the Prometheus host only.
    metrics_host: str = "127.0.0.1"

    @property
    def principal(self) -> str:
        return f"party-{self.index}"

    @model_validator(mode="after")
    def _index(self):
        if self.index >= self.parties:
            raise ValueError("index must be < parties")
        return self


class CoordinatorSettings(_TLS):
    """The coordinator: registers principals, opens and closes rounds. Holds no shares."""

    model_config = SettingsConfigDict(env_prefix="IOMT_COORD_", extra="forbid")

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8790
    registry: Path
    key_file: Path
    principal: str = "coordinator"
    #: Base URLs of the parties, in party-index order.
    party_urls: list[str] = Field(min_length=2)
    rounds: int = Field(default=3, ge=1)
    #: Seconds between a round opening and its deadline.
    round_timeout: float = Field(default=60.0, gt=0)
    #: Hospitals that must have registered before the first round opens.
    min_hospitals: int = Field(default=1, ge=1)
    strategy: str = "fedavg"
    prox_mu: float = Field(default=0.0, ge=0)
    #: FedAdam / FedYogi server optimiser (used only by those strategies), see mpc/server_opt.py.
    server_lr: float = Field(default=0.01, gt=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)
    #: JSON file: {"arch": str, "config": {...}, "spec": [[name, shape], ...], "init_seed": int}.
    model_file: Path
    poll_interval: float = Field(default=0.25, gt=0)
    #: Most samples one hospital may claim per round; published in each round config, enforced
    #: by the parties and again here (with the registry's per-hospital ``max_samples``).
    max_samples: int = Field(default=MAX_SAMPLES_DEFAULT, ge=1)
    #: Plain-HTTP port serving Prometheus metrics (cloud_aggregator.metrics: counts, durations and
    #: states, nothing secret); None: off, 0: any free port. deploy/ uses 9102.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: Address of the metrics port: loopback, or the management interface that the firewall
    #: opens to the Prometheus host only.
    metrics_host: str = "127.0.0.1"
    #: A round closing with fewer participants fails closed: it is never aggregated or published
    #: (default 1, or K with distributed noise). Rounds open once this many hospitals registered.
    min_participants: int | None = Field(default=None, ge=1)
    #: Distributed noise (hospital-level DP of the aggregate): K, the number of hospitals whose
    #: noise shares add up to the full noise; each adds N(0, σ²C²/K) to its clipped update.
    distributed_noise_hospitals: int | None = Field(default=None, ge=1)
    #: σ of the aggregate's noise (std σC); needed with distributed_noise_hospitals.
    distributed_noise_multiplier: float | None = Field(default=None, gt=0)
    #: C: the L2 bound on each hospital's whole update; needed with distributed_noise_hospitals.
    distributed_noise_clip: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _distributed_noise(self):
        k = self.distributed_noise_hospitals
        given = (self.distributed_noise_multiplier, self.distributed_noise_clip)
        if k is None:
            if any(v is not None for v in given):
                raise ValueError("distributed_noise_multiplier and distributed_noise_clip need "
                                 "distributed_noise_hospitals (K)")
            return self
        if any(v is None for v in given):
            raise ValueError("distributed_noise_hospitals needs distributed_noise_multiplier and distributed_noise_clip")
        if self.min_participants is None:
            self.min_participants = k
        elif self.min_participants < k:
            raise ValueError(f"min_participants {self.min_participants} < distributed_noise_hospitals {k}: a round "
                             "with fewer than K participants would carry less than the announced noise")
        return self


class TriplesSettings(BaseSettings):
    """The trusted third party that deals Beaver triples (``iomt cloud triples``)."""

    model_config = SettingsConfigDict(env_prefix="IOMT_TRIPLES_", extra="forbid")

    #: Number of computing parties n (the provider joins as rank n).
    parties: int = Field(ge=2)
    #: host:port of party 0's MPC rendezvous.
    mpc_master: str
    mpc_address: str | None = None
    mpc_interface: str | None = None
    #: Development only: join over an unprotected MPC link (logged at WARNING).
    mpc_insecure: bool = False
    #: Stop after serving this many MPC groups (0: forever).
    max_groups: int = Field(default=0, ge=0)
