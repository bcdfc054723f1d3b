"""The TLS side of every client of the federation: verify the server against the federation's CA
(and CRL), present this client's own certificate (mutual TLS), and pin each URL to the principal
that must answer there (:class:`PinnedTransport`); certificates themselves: :mod:`protocols.pki`.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx

from protocols.auth import check_principal_id

#: Every certificate also carries the DNS name ``<id>.principal.iomt.invalid`` (``.invalid``:
#: never resolvable). A client that must reach principal P asks TLS to verify that name
#: (:func:`principal_host`, sent as SNI), so the handshake itself fails, before any byte of a
#: request, when the server is any other principal, whatever its host names.
PRINCIPAL_HOST = ".principal.iomt.invalid"


def principal_host(principal: str) -> str:
    """The DNS name in ``principal``'s certificate that names the principal (see PRINCIPAL_HOST)."""
    return check_principal_id(principal).lower() + PRINCIPAL_HOST


def pin_extensions(url: str, principal: str) -> dict[str, str]:
    """httpx request ``extensions=`` that make the TLS handshake accept only ``principal``'s
    certificate at ``url`` ({} for plain http)."""
    return {"sni_hostname": principal_host(principal)} if url.startswith("https://") else {}


def client_context(ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None,
                   crl: str | Path | None = None) -> ssl.SSLContext | bool:
    """The TLS context of a federation client (for ``httpx``'s ``verify=``).

    Verifies servers against the CA ``ca`` (and, when given, its CRL ``crl``: a revoked server
    certificate fails the handshake) and presents ``cert``/``key`` for mutual TLS. Without
    ``ca``: True (the system's CAs, no client certificate).
    """
    if ca is None:
        if cert is not None:
            raise ValueError("a client certificate needs the federation's CA (tls_ca)")
        return True
    context = ssl.create_default_context(cafile=str(ca))
    if crl is not None:
        context.load_verify_locations(cafile=str(crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


@dataclass(frozen=True)
class ClientTls:
    """A client's TLS files (hashable, so that a pooled HTTP client can be kept per setting)."""

    ca: Path | None
    cert: Path | None = None
    key: Path | None = None
    crl: Path | None = None

    def context(self) -> ssl.SSLContext | bool:
        return client_context(self.ca, self.cert, self.key, self.crl)


class PinnedTransport:
    """An httpx transport (sync or async, wrapping ``inner``) that pins origins to principals:
    a request to an origin in ``pins`` (base URL -> principal id) carries that principal's
    :func:`pin_extensions`, so TLS accepts only that principal's certificate there."""

    def __init__(self, inner, pins: dict[str, str] | None = None) -> None:
        self.inner, self._pins = inner, {}
        for url, principal in (pins or {}).items():
            self.pin(url, principal)

    @staticmethod
    def _origin(url) -> tuple[str, str, int | None]:
        u = httpx.URL(str(url))
        return u.scheme, u.host, u.port

    def pin(self, url: str, principal: str) -> None:
        self._pins[self._origin(url)] = pin_extensions(str(url), principal)

    def _pinned(self, request):
        ext = self._pins.get(self._origin(request.url))
        if ext:
            request.extensions = {**request.extensions, **ext}
        return request

    def handle_request(self, request):
        return self.inner.handle_request(self._pinned(request))

    async def handle_async_request(self, request):
        return await self.inner.handle_async_request(self._pinned(request))

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)

    async def __aenter__(self):
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.inner.__aexit__(*exc)
