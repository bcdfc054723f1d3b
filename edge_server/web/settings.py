"""Settings of the clinician's page (``iomt edge web``): flags, ``IOMT_EDGE_WEB_*`` or kwargs."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocols.netaddr import is_loopback


class WebSettings(BaseSettings):
    """Where the page listens, which store it shows, and which cloud it asks."""

    model_config = SettingsConfigDict(env_prefix="IOMT_EDGE_WEB_", extra="forbid")

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Cloud parties' base URLs in party-index order; empty = "Ask the cloud" is off.
    parties: list[str] = Field(default_factory=list)
    #: This hospital's Ed25519 key file (signs the encrypted-inference requests).
    key_file: Path | None = None
    #: The federation's CA certificate (verifies the parties' TLS certificates).
    ca: Path | None = None
    #: This hospital's own TLS certificate and key for the cloud (the parties require one
    #: signed by the federation's CA: mutual TLS), and the CA's revocation list.
    cloud_tls_cert: Path | None = None
    cloud_tls_key: Path | None = None
    cloud_tls_crl: Path | None = None
    #: Global model version to ask for (default: the newest the parties hold).
    model_version: int | None = None
    #: This page's own TLS certificate and key; without them it serves plain HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Plain HTTP on a non-loopback address is refused unless a TLS-terminating proxy
    #: (the hospital's single sign-on gateway) sits in front; then set this.
    behind_proxy: bool = False
    #: Single sign-on: a header carrying the signed-in user, trusted only from these proxy
    #: addresses (e.g. ``X-Remote-User`` from an OIDC/SAML gateway). The user must still have
    #: an account here (`iomt edge users add`); no password is asked.
    remote_user_header: str | None = None
    trusted_proxies: list[str] = Field(default_factory=list)
    #: Idle minutes before a session ends.
    session_minutes: float = Field(30.0, gt=0)
    page_size: int = Field(20, ge=1, le=500)

    @model_validator(mode="after")
    def _transport(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_cert is None and not self.behind_proxy and not is_loopback(self.host):
            raise ValueError(f"refusing plain HTTP on {self.host}: give tls_cert/tls_key, or set behind_proxy "
                             "when a TLS-terminating gateway is in front")
        if self.parties and self.key_file is None:
            raise ValueError("parties need key_file (this hospital's key) to sign requests")
        return self

    @property
    def secure_cookies(self) -> bool:
        """Cookies carry ``Secure`` whenever the browser reaches us over TLS."""
        return self.tls_cert is not None or self.behind_proxy
