"""One uvicorn start-up for the cloud services (party and coordinator): listen address, TLS, graceful stop."""
from __future__ import annotations

from fastapi import FastAPI

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


def serve(app: FastAPI, settings) -> None:
    """Serve ``app`` on ``settings.host:settings.port``, over TLS when the settings name a certificate."""
    import uvicorn

    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=GRACE_S,
                ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
                ssl_keyfile=str(settings.tls_key) if settings.tls_key else None)
