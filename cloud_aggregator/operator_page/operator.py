"""Routes of the operator's page, mounted on the coordinator's app by :func:`install_operator_page`.

Authentication is the coordinator API's: a short-lived Ed25519 bearer token of role
``coordinator`` (`iomt cloud operator-token`), verified against the registry. A browser
pastes a fresh one into the sign-in form and gets a session cookie (random id, ``HttpOnly``,
``SameSite=Strict``, ``Secure`` when the coordinator serves TLS) that lasts SESSION_S at most
and IDLE_S unused; every request checks again that the principal is in the registry and not
revoked, so a revocation ends the session at once. Scripts send the token as
``Authorization: Bearer ...`` instead. Everything is read-only.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import secrets
import time
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from cloud_aggregator.operator_page.view import PARTY_CACHE_S, Clock, party_health, snapshot
from protocols import webui
from protocols.auth import AuthError

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
PREFIX = "/operator"
COOKIE = "iomt_operator"
ROLES = ("coordinator",)
#: Longest session, and longest time unused, after a sign-in (seconds).
SESSION_S, IDLE_S = 8 * 3600.0, 1800.0
#: Largest sign-in form body read (a token is about 300 bytes).
MAX_FORM_BYTES = 16 * 1024
#: Paths whose successful answers do not count as a hospital being seen.
_NOT_SEEN = ("/health", PREFIX)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _subject(header: str | None) -> str | None:
    """The ``sub`` of a bearer token (already verified by the route that answered 2xx)."""
    if not header or not header.startswith("Bearer "):
        return None
    try:
        body = header[len("Bearer "):].split(".")[0]
        return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))).get("sub")
    except (ValueError, AttributeError):
        return None


def install_operator_page(app: FastAPI, coord) -> None:
    """Mount ``/operator`` on the coordinator's ``app`` and note when each hospital was last seen."""
    settings = coord.settings
    sessions: dict[str, dict] = {}
    last_seen: dict[str, float] = {}
    clock = Clock()
    cache: dict = {"at": 0.0, "parties": []}
    verify = settings.client_tls()  # the coordinator's own certificate, to read the parties' /health
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    secure = settings.tls_cert is not None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async def watch() -> None:  # the timeline's times, also while nobody has the page open
            while True:
                clock.observe(dict(coord.rounds))
                await asyncio.sleep(settings.poll_interval)
        task = asyncio.create_task(watch())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    router = APIRouter(prefix=PREFIX, lifespan=lifespan, include_in_schema=False)  # pages, not API

    @app.middleware("http")
    async def seen(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        if response.status_code < 400 and not path.startswith(_NOT_SEEN):
            sub = _subject(request.headers.get("authorization"))
            if sub and sub in coord.registry.principals("hospital"):
                last_seen[sub] = time.time()
        if path.startswith(PREFIX):
            for k, v in SECURITY_HEADERS.items():
                response.headers.setdefault(k, v)
        return response

    def operator(request: Request) -> str | None:
        """The signed-in operator, by bearer header or session cookie; None if neither holds."""
        header = request.headers.get("authorization")
        if header:
            try:
                return coord.registry.verify_header(header, settings.principal, ROLES).sub
            except AuthError as err:
                coord.counters["operator_auth_rejected"] += 1
                coord.metrics.tokens_refused.labels(reason=err.reason).inc()
                log.warning("operator page refused %s: %s", request.url.path, err)
                return None
        sid = request.cookies.get(COOKIE, "")
        session = sessions.get(sid)
        if session is None:
            return None
        now = time.time()
        if now > session["exp"] or now - session["used"] > IDLE_S \
                or session["who"] not in coord.registry.principals(ROLES[0]):  # expired, idle, or revoked
            sessions.pop(sid, None)
            log.warning("operator session of %s ended (expired, idle or revoked)", session["who"])
            return None
        session["used"] = now
        return session["who"]

    async def state() -> dict:
        if time.monotonic() - cache["at"] > PARTY_CACHE_S:
            cache["parties"] = await party_health(list(settings.party_urls), verify)
            cache["at"] = time.monotonic()
        return snapshot(coord, clock, cache["parties"], last_seen)

    def login_page(request: Request, error: str = "", status: int = 200) -> HTMLResponse:
        return templates.TemplateResponse(request, "operator_login.html", {"error": error}, status_code=status)

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request):
        return login_page(request)

    async def form(request: Request) -> dict[str, list[str]] | None:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return None
        return parse_qs(body.decode("utf-8", "replace"))

    @router.post("/login")
    async def login(request: Request):
        form_data = await form(request)
        if form_data is None:
            return login_page(request, "The form was too large.", 413)
        token = (form_data.get("token") or [""])[0].strip()
        try:
            who = coord.registry.verify(token, settings.principal, ROLES).sub
        except AuthError as err:
            coord.counters["operator_auth_rejected"] += 1
            coord.metrics.tokens_refused.labels(reason=err.reason).inc()
            log.warning("operator sign-in refused: %s", err)
            return login_page(request, f"Token refused: {err.detail}.", 401)
        sid = secrets.token_urlsafe(32)
        now = time.time()
        for k in [k for k, s in sessions.items() if s["exp"] < now]:
            sessions.pop(k, None)
        sessions[sid] = {"who": who, "exp": now + SESSION_S, "used": now, "csrf": secrets.token_urlsafe(24)}
        log.info("operator %s signed in to the page", who)
        resp = RedirectResponse(PREFIX, status_code=303)
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="strict", secure=secure, path=PREFIX)
        return resp

    @router.post("/logout")
    async def logout(request: Request):
        form_data = await form(request) or {}
        session = sessions.get(request.cookies.get(COOKIE, ""))
        if session and hmac.compare_digest((form_data.get("csrf") or [""])[0], session["csrf"]):
            sessions.pop(request.cookies.get(COOKIE, ""), None)
        resp = RedirectResponse(f"{PREFIX}/login", status_code=303)
        resp.delete_cookie(COOKIE, path=PREFIX)
        return resp

    @router.get("", response_class=HTMLResponse)
    async def page(request: Request):
        who = operator(request)
        if who is None:
            return RedirectResponse(f"{PREFIX}/login", status_code=303)
        session = sessions.get(request.cookies.get(COOKIE, ""))
        return templates.TemplateResponse(request, "operator.html", {
            "s": await state(), "who": who, "csrf": session["csrf"] if session else ""})

    @router.get("/live", response_class=HTMLResponse)
    async def live(request: Request):
        """The page's live part alone; the page's script swaps it in every second."""
        if operator(request) is None:
            return Response("signed out", status_code=401)
        return templates.TemplateResponse(request, "operator_live.html", {"s": await state()})

    @router.get("/state.json")
    async def state_json(request: Request):
        if operator(request) is None:
            return JSONResponse({"error": "unauthorized", "detail": "operator token required"}, status_code=401)
        return await state()

    app.mount(f"{PREFIX}/static/common", StaticFiles(directory=str(webui.STATIC_DIR)), name="operator-static-common")
    app.mount(f"{PREFIX}/static", StaticFiles(directory=str(HERE / "static")), name="operator-static")
    app.include_router(router)
