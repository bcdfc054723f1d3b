"""Mutual TLS for the party and the coordinator: the client's certificate, bound to its token.

uvicorn asks every client for a certificate signed by the federation's CA (``CERT_REQUIRED``)
but does not put that certificate into the ASGI scope. :class:`PeerCertProtocol` (uvicorn's
h11 protocol, one instance per connection) adds it as the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM, as the ASGI spec's TLS extension
defines it). :class:`CertificateBinding`, an ASGI middleware, then refuses (403, counted as
``auth_rejected_403`` and ``cert_<reason>``, logged at WARNING) a request

- whose client certificate names no federation principal (``cert_no_principal``),
- whose certificate the CRL revokes (``cert_revoked``; the CRL file is re-read when it
  changes, so a revocation needs no restart), or
- whose bearer token's subject is not the certificate's principal (``cert_mismatch``):
  a party's certificate cannot carry the coordinator's or a hospital's token.

Comparing the token's *unverified* ``sub`` is sound: the route verifies the signature
afterwards, so a request passes only with a valid token of the certificate's principal.
"""
from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
from collections.abc import MutableMapping
from pathlib import Path

from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol

from cloud_aggregator.web import error_response
from protocols.pki import cert_principal

log = logging.getLogger(__name__)


class PeerCertProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, adding the peer's certificate to each request's scope."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is not None:
            tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)], "client_cert_error": None,
                   "tls_version": None, "cipher_suite": None}
            self.app = _WithTls(self.app, tls)


class _WithTls:
    """An ASGI app that adds the connection's TLS facts to every scope."""

    def __init__(self, app, tls: dict) -> None:
        self.app, self.tls = app, tls

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": self.tls}}
        return await self.app(scope, receive, send)


class RevocationList:
    """The serial numbers a CRL file revokes, re-read when the file changes (None: no CRL)."""

    def __init__(self, path: Path | None, ca: Path | None) -> None:
        self.path = path
        self._ca = x509.load_pem_x509_certificate(ca.read_bytes()) if ca and path else None
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._serials: frozenset[int] = frozenset()
        if path is not None:
            self._load()

    def _load(self) -> None:
        mtime = self.path.stat().st_mtime_ns
        if mtime == self._mtime:
            return
        crl = x509.load_pem_x509_crl(self.path.read_bytes())
        if self._ca is not None and not crl.is_signature_valid(self._ca.public_key()):
            raise ValueError(f"CRL {self.path} is not signed by the federation's CA")
        self._serials = frozenset(r.serial_number for r in crl)
        self._mtime = mtime

    def revoked(self, serial: int) -> bool:
        if self.path is None:
            return False
        with self._lock:
            try:
                self._load()
            except (OSError, ValueError) as err:  # a broken copy keeps the last good list
                log.warning("keeping the previous CRL: %s", err)
            return serial in self._serials


def _token_subject(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The ``sub`` a bearer token claims (not verified here: the route verifies it)."""
    for name, value in headers:
        if name == b"authorization" and value.startswith(b"Bearer "):
            body = value[len(b"Bearer "):].split(b".")[0]
            try:
                sub = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))).get("sub")
            except (ValueError, AttributeError):
                return None  # malformed: the route answers 401
            return sub if isinstance(sub, str) else None
    return None


class CertificateBinding:
    """ASGI middleware: every request over TLS names, by its client certificate, the principal
    whose token it carries (see the module docstring)."""

    def __init__(self, app, service: str, counters: MutableMapping[str, int], crl: RevocationList) -> None:
        self.app, self.service, self.counters, self.crl = app, service, counters, crl

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chain = ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_chain") or []
        if not chain:  # plain HTTP (--insecure-http): only the tokens authenticate
            return await self.app(scope, receive, send)
        cert = x509.load_pem_x509_certificate(chain[0].encode())
        who = cert_principal(cert)
        sub = _token_subject(scope.get("headers") or [])
        if who is None:
            reason, detail = "cert_no_principal", "the client certificate names no federation principal"
        elif self.crl.revoked(cert.serial_number):
            reason, detail = "cert_revoked", f"the client certificate of {who!r} (serial {cert.serial_number:x}) is revoked by the CRL"
        elif sub is not None and sub != who:
            reason, detail = "cert_mismatch", f"the token is {sub!r}'s but the client certificate names {who!r}"
        else:
            scope = {**scope, "state": {**(scope.get("state") or {}), "peer_principal": who}}
            return await self.app(scope, receive, send)
        self.counters["auth_rejected_403"] += 1
        self.counters[reason] += 1
        client = scope.get("client") or ("?", 0)
        log.warning("%s refused %s %s from %s: %s: %s", self.service, scope.get("method"), scope.get("path"),
                    client[0], reason, detail)
        return await error_response(403, "forbidden", f"{reason}: {detail}")(scope, receive, send)
