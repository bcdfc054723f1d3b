"""The HTTP boundary shared by the party and the coordinator: request bodies bounded while
they stream in, JSON bodies parsed with a nesting limit (protocols.safejson), and one error body
(:class:`protocols.aggregation_messages.ErrorBody`) for every refusal, declared in the
OpenAPI of each route.

Every refusal is counted (``rejected_<reason>`` in the service's JSON ``/metrics``, and in its
Prometheus counters, cloud_aggregator.metrics) and logged at
WARNING with the method and path; the service keeps serving.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocols import safejson
from protocols.aggregation_messages import ErrorBody
from protocols.errors import ProtocolError

log = logging.getLogger(__name__)

#: The 4xx answers a route may give, for its OpenAPI ``responses=``; all carry ErrorBody.
_DESCRIPTIONS = {400: "Malformed request", 401: "Missing, malformed or expired token",
                 403: "Principal revoked or not allowed here", 404: "No such round or version",
                 409: "Conflicts with the round's state", 413: "Request body over the limit",
                 422: "Invalid path, query or body field", 503: "A service it depends on is down",
                 504: "Timed out"}
_REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            405: "method_not_allowed", 409: "conflict", 413: "too_large", 422: "invalid"}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for ``codes``, each with the shared :class:`ErrorBody`."""
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in codes}


class Refused(StarletteHTTPException):
    """A request refused at the HTTP boundary: answered ``status`` with ErrorBody(reason, detail).

    A subclass of Starlette's HTTPException so that FastAPI passes it through unchanged when
    it is raised while FastAPI itself reads the body. ``noted`` means the raiser already
    counted and logged it.
    """

    def __init__(self, status: int, reason: str, detail: str = "", noted: bool = False) -> None:
        super().__init__(status, detail)
        self.reason, self.noted = reason, noted


def error_response(status: int, reason: str, detail: str = "") -> JSONResponse:
    return JSONResponse(ErrorBody(error=reason, detail=detail[:500]).model_dump(), status_code=status)


def parse_json(raw: bytes | bytearray) -> Any:
    """Decode a JSON body or raise :class:`Refused` 400 ``bad_json`` (never a traceback)."""
    try:
        return safejson.loads(raw)
    except ProtocolError as err:
        raise Refused(400, err.reason, f"JSON {err.detail}") from err


class BoundedRequest(Request):
    """A request whose body raises :class:`Refused` 413 as soon as it passes ``limit`` bytes.

    The declared Content-Length is checked before anything is read, and the running total of
    the chunks received is checked as they arrive, so a chunked body cannot grow past the
    limit either. :meth:`json` refuses deep nesting (FastAPI parses JSON bodies with it).
    """

    def __init__(self, scope, receive, send, limit: int) -> None:
        self.limit, self.received = limit, 0

        async def bounded():
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                if self.received > limit:
                    raise Refused(413, "too_large", f"request body exceeds {limit} bytes")
            return message

        super().__init__(scope, bounded, send)

    def check_declared_length(self) -> None:
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise Refused(413, "too_large", f"Content-Length {declared} exceeds {self.limit} bytes")

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


async def read_body(request: Request) -> bytearray:
    """The whole body, chunk by chunk (the limit of a :class:`BoundedRequest` applies).

    A bytearray grown in place: one copy of the body in memory, where joining a list of
    chunks briefly holds two.
    """
    buf = bytearray()
    chunks: AsyncIterator[bytes] = request.stream()
    async for chunk in chunks:
        buf += chunk
    return buf


def bounded_route(limit_for: Callable[[APIRoute], int]) -> type[APIRoute]:
    """An APIRoute class whose handlers get a :class:`BoundedRequest` with ``limit_for(route)``."""

    class BoundedRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()
            limit = limit_for(self)

            async def bounded(request: Request):
                req = BoundedRequest(request.scope, request.receive, request._send, limit)
                req.check_declared_length()
                return await handler(req)

            return bounded

    return BoundedRoute


def install_error_handlers(app: FastAPI, service: str, counters: collections.Counter,
                           on_refusal: Callable[[Request, int, str], None] | None = None) -> None:
    """Answer every refusal of ``app`` with ErrorBody, count it and log it at WARNING.

    Covers :class:`Refused`, FastAPI's validation errors (422 ``invalid``; 400 ``bad_json`` for
    undecodable bodies) and Starlette's own HTTP errors (404 unknown path, 405 method).
    Services register their domain errors (ShareError, AuthError ...) through :func:`refuse`.
    ``on_refusal(request, status, reason)`` also sees every refusal (the Prometheus counters).
    """

    def note(request: Request, status: int, reason: str, detail: str) -> None:
        counters[f"rejected_{reason}"] += 1
        if on_refusal is not None:
            on_refusal(request, status, reason)
        log.warning("%s refused %s %s: %d %s: %.200s", service, request.method, request.url.path,
                    status, reason, detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        if isinstance(err, Refused):
            reason, detail = err.reason, str(err.detail)
            if not err.noted:
                note(request, err.status_code, reason, detail)
        else:
            reason, detail = _REASONS.get(err.status_code, "refused"), str(err.detail)
            note(request, err.status_code, reason, detail)
        return error_response(err.status_code, reason, detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        errors = err.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        status, reason = (400, "bad_json") if first.get("type") == "json_invalid" else (422, "invalid")
        detail = f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', '')}"
        note(request, status, reason, detail)
        return error_response(status, reason, detail)

    app.state.refuse_note = note


def refuse(request: Request, status: int, reason: str, detail: str) -> JSONResponse:
    """Count, log and answer a domain error caught by a service's own exception handler."""
    request.app.state.refuse_note(request, status, reason, detail)
    return error_response(status, reason, detail)
