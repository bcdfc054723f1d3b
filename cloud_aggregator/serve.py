"""One uvicorn start-up for the cloud services (party and coordinator): listen address, mutual
TLS, graceful stop.

With ``tls_cert``/``tls_key``/``tls_ca`` a service serves HTTPS and requires every client to
present a certificate signed by the federation's CA, bound to its token
(:mod:`cloud_aggregator.mtls`). Plain HTTP only with ``insecure_http`` (``--insecure-http``),
logged at WARNING; with neither, :func:`transport_error` says why the service will not start
(its ``run`` exits 2).
"""
from __future__ import annotations

import logging
import ssl
from collections.abc import MutableMapping

from fastapi import FastAPI

log = logging.getLogger(__name__)

#: Seconds uvicorn waits for requests in flight after SIGTERM before it closes them.
GRACE_S = 2


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` means loopback) -> (host, port)."""
    host, _, port = listen.rpartition(":")
    return host or "127.0.0.1", int(port)


def listen_flags(listen: str | None) -> dict[str, object]:
    """``--listen HOST:PORT`` as the settings keys ``host`` and ``port`` ({} when not given)."""
    if listen is None:
        return {}
    host, port = split_listen(listen)
    return {"host": host, "port": port}


def add_tls_arguments(parser, what: str) -> None:
    """The TLS flags of a cloud service (settings keys ``tls_cert``, ``tls_key``, ``tls_ca``,
    ``tls_crl``, ``insecure_http``)."""
    parser.add_argument("--tls-cert", help="this service's own certificate (PEM, signed by the federation's CA); "
                        "served to clients and presented to the services it calls")
    parser.add_argument("--tls-key", help="its private key (PEM, made on this host by `iomt keys init`)")
    parser.add_argument("--tls-ca", help=f"the federation's CA certificate: clients must present a certificate "
                        f"it signed, and it verifies {what}")
    parser.add_argument("--tls-crl", help="the federation CA's revocation list (crl.pem), re-read when it changes")
    parser.add_argument("--insecure-http", action="store_true", default=None,
                        help="development only: serve plain HTTP without TLS material (logged at WARNING)")


def tls_flags(args) -> dict[str, object]:
    return {"tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_ca": args.tls_ca, "tls_crl": args.tls_crl,
            "insecure_http": args.insecure_http}


def transport_error(settings, service: str) -> str | None:
    """Why ``service`` must not start with these settings (None: it may); warns for plain HTTP."""
    if settings.tls_cert is not None:
        from cloud_aggregator.mtls import RevocationList
        try:  # unreadable or mismatching files: a clear message now, not a traceback from uvicorn
            context = ssl.create_default_context(cafile=str(settings.tls_ca))
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
            RevocationList(settings.tls_crl, settings.tls_ca)
        except (OSError, ValueError, ssl.SSLError) as err:
            return f"{service}: TLS files ({settings.tls_cert}, {settings.tls_key}, {settings.tls_ca}, {settings.tls_crl}): {err}"
        return None
    if settings.insecure_http:
        log.warning("%s serves PLAIN HTTP on %s:%d (insecure_http): tokens, shares and queries cross the "
                    "network unencrypted and clients are not authenticated by certificate; development only",
                    service, settings.host, settings.port)
        return None
    return (f"{service}: no TLS material. Give tls_cert, tls_key and tls_ca (--tls-cert/--tls-key/--tls-ca; "
            "`iomt keys init` on this host, `iomt ca sign` at the operator), or --insecure-http "
            "(insecure_http = true) for plain HTTP in development")


def serve(app: FastAPI, settings, service: str, counters: MutableMapping[str, int]) -> None:
    """Serve ``app`` on ``settings.host:settings.port``: mutual TLS when the settings name a
    certificate (clients must present one the CA signed; :class:`CertificateBinding` ties it to
    the token), plain HTTP otherwise (:func:`transport_error` has checked that this is allowed)."""
    import uvicorn

    from cloud_aggregator.mtls import CertificateBinding, PeerCertProtocol, RevocationList

    if settings.tls_cert is None:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                    timeout_graceful_shutdown=GRACE_S)
        return
    crl = RevocationList(settings.tls_crl, settings.tls_ca)
    uvicorn.run(CertificateBinding(app, service, counters, crl), host=settings.host, port=settings.port,
                log_level="warning", timeout_graceful_shutdown=GRACE_S, http=PeerCertProtocol,
                ssl_certfile=str(settings.tls_cert), ssl_keyfile=str(settings.tls_key),
                ssl_ca_certs=str(settings.tls_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
