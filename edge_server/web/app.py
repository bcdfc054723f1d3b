"""The clinician's page as a FastAPI app: sign-in, patient search, patient view, "Ask the cloud".

Sessions live in this process (a random 256-bit id in an ``HttpOnly``, ``SameSite=Strict``
cookie, ``Secure`` over TLS); every form that changes something carries the session's CSRF
token (OWASP's synchroniser-token pattern), the sign-in form a double-submit one. Every
request, signed in or not, is appended to ``<data-dir>/audit/web.jsonl`` with the user.

The encrypted prediction is not computed here: :func:`create_app` is given ``ask_cloud``,
(``data_dir``, ``patient``) -> the `iomt infer --json` result, so this package never imports
the cloud's client (`iomt edge web` wires in :func:`iomt.infer.ask_cloud`).
"""
from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from edge_server.web.accounts import Accounts
from edge_server.web.patients import NoStore, image_png, patient_view, search
from edge_server.web.settings import WebSettings
from protocols import webui
from protocols.errors import Refusal
from protocols.schema import MODALITIES

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "iomt_session"
LOGIN_COOKIE = "iomt_login_csrf"
AUDIT_FILE = Path("audit") / "web.jsonl"
#: Largest form body read (the forms carry a user name, a password and tokens).
MAX_FORM_BYTES = 16 * 1024
#: Failed sign-ins per user name within FAIL_WINDOW_S before further tries are refused.
MAX_FAILS, FAIL_WINDOW_S = 5, 300.0
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
#: What the clinician reads for each failure code of the encrypted-inference client.
CLOUD_MESSAGES = {
    "unreachable": "The cloud is unreachable: {detail}. The edge's own prediction is still shown.",
    "version": "The cloud refused the model version: {detail}.",
    "checks": "The cloud's answer failed its checks and is not shown: {detail}.",
    "refused": "The cloud refused the request: {detail}.",
    "input": "This patient's data cannot form a query: {detail}.",
    "off": "Asking the cloud is not configured on this edge (no parties given).",
}
CODE_KIND = {"party_unreachable": "unreachable", "mpc_unavailable": "unreachable", "timeout": "unreachable",
             "no_model": "version", "model_mismatch": "version", "bad_model": "version",
             "model_out_of_range": "version",
             "inconsistent_parties": "checks", "bad_answer": "checks", "answer_out_of_range": "checks",
             "bad_input": "input", "bad_shape": "input", "no_global_model": "input", "input_out_of_range": "input"}

AskCloud = Callable[[Path, str], dict]


class CloudError(Refusal):
    """The encrypted prediction failed; ``reason`` is the inference client's reason."""

    @property
    def kind(self) -> str:
        return CODE_KIND.get(self.reason, "refused")

    def for_clinician(self) -> str:
        return CLOUD_MESSAGES[self.kind].format(detail=self.detail)


@dataclass
class Session:
    user: str
    csrf: str
    expires: float


class Sessions:
    """Signed-in sessions of this process, ended by sign-out or after ``idle_s`` unused."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def start(self, user: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._by_id = {k: s for k, s in self._by_id.items() if s.expires > now}
            session = self._by_id[sid] = Session(user, secrets.token_urlsafe(24), now + self.idle_s)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._by_id.get(sid)
            if session is None or session.expires < time.time():
                self._by_id.pop(sid, None)
                return None
            session.expires = time.time() + self.idle_s
            return session

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


class AuditLog:
    """Append-only JSON lines: who asked for what, and the answer's status."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, **entry) -> None:
        line = json.dumps({"time": time.time(), **entry}, separators=(",", ":"))
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _pct(p: float) -> str:
    return f"{100 * p:.1f} %"


def create_app(settings: WebSettings, ask_cloud: AskCloud | None = None) -> FastAPI:
    """The clinician's page for the store in ``settings.data_dir``."""
    from edge_server.inference.onnx_predict import predict_patient

    accounts = Accounts(settings.data_dir)
    sessions = Sessions(settings.session_minutes * 60)
    audit = AuditLog(Path(settings.data_dir) / AUDIT_FILE)
    fails: dict[str, list[float]] = {}
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["pct"] = _pct
    app = FastAPI(title="iomt clinician", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static/common", StaticFiles(directory=str(webui.STATIC_DIR)), name="static-common")
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def cookie(resp: Response, name: str, value: str, max_age: int | None = None) -> None:
        resp.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict",
                        secure=settings.secure_cookies, path="/")

    def current_user(request: Request) -> Session | None:
        if settings.remote_user_header and request.client and request.client.host in settings.trusted_proxies:
            user = request.headers.get(settings.remote_user_header)
            if user and accounts.exists(user):
                sid = request.cookies.get(SESSION_COOKIE)
                session = sessions.get(sid)
                if session is None or session.user != user:
                    sid, session = sessions.start(user)
                    request.state.new_sid = sid
                return session
        return sessions.get(request.cookies.get(SESSION_COOKIE))

    @app.middleware("http")
    async def audit_and_headers(request: Request, call_next):
        request.state.user = None
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        sid = getattr(request.state, "new_sid", None)
        if sid:
            cookie(response, SESSION_COOKIE, sid)
        if not request.url.path.startswith("/static/"):
            audit.write(user=request.state.user, method=request.method, path=request.url.path,
                        query=request.url.query, status=response.status_code,
                        client=request.client.host if request.client else None,
                        **getattr(request.state, "audit", {}))
        return response

    def signed_in(request: Request) -> Session | None:
        session = current_user(request)
        request.state.user = session.user if session else None
        return session

    def to_login(request: Request) -> RedirectResponse:
        return RedirectResponse(f"/login?next={quote(str(request.url.path))}", status_code=303)

    async def form(request: Request) -> dict[str, str]:
        """The urlencoded form; an oversized one reads as empty (and so fails its CSRF check)."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                log.warning("form body over %d bytes on %s refused", MAX_FORM_BYTES, request.url.path)
                return {}
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}

    def page(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        session = current_user(request) if "session" not in ctx else ctx.pop("session")
        return templates.TemplateResponse(request, name, {"session": session, **ctx}, status_code=status)

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/patients", error: str = ""):
        token = secrets.token_urlsafe(24)
        resp = page(request, "login.html", session=None, csrf=token, next=next, error=error,
                    sso=bool(settings.remote_user_header))
        cookie(resp, LOGIN_COOKIE, token, max_age=600)
        return resp

    @app.post("/login")
    async def login(request: Request):
        data = await form(request)
        user, password, nxt = data.get("username", ""), data.get("password", ""), data.get("next", "/patients")
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/patients"
        request.state.audit = {"attempted_user": user[:64]}
        if not hmac.compare_digest(data.get("csrf", ""), request.cookies.get(LOGIN_COOKIE, "") or "-"):
            return page(request, "login.html", 400, session=None, csrf="", next=nxt,
                        error="The sign-in form expired; please try again.")
        now = time.time()
        recent = [t for t in fails.get(user, []) if now - t < FAIL_WINDOW_S]
        if len(recent) >= MAX_FAILS:
            log.warning("sign-in for %r refused: %d failures in %.0fs", user[:64], len(recent), FAIL_WINDOW_S)
            return _login_again(request, nxt, "Too many failed sign-ins; wait a few minutes.", 429)
        if not accounts.verify(user, password):
            if len(fails) > 10_000:  # bound the memory a flood of made-up names can take
                for name in [n for n, ts in fails.items() if now - ts[-1] >= FAIL_WINDOW_S]:
                    del fails[name]
            fails[user] = [*recent, now]
            log.warning("failed sign-in for %r from %s", user[:64], request.client.host if request.client else "?")
            return _login_again(request, nxt, "Wrong user name or password.", 401)
        fails.pop(user, None)
        sessions.end(request.cookies.get(SESSION_COOKIE))  # a fresh id at every sign-in (no fixation)
        sid, _ = sessions.start(user)
        request.state.user = user
        resp = RedirectResponse(nxt, status_code=303)
        cookie(resp, SESSION_COOKIE, sid)
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return resp

    def _login_again(request: Request, nxt: str, error: str, status: int) -> HTMLResponse:
        token = secrets.token_urlsafe(24)
        resp = page(request, "login.html", status, session=None, csrf=token, next=nxt, error=error,
                    sso=bool(settings.remote_user_header))
        cookie(resp, LOGIN_COOKIE, token, max_age=600)
        return resp

    @app.post("/logout")
    async def logout(request: Request):
        session = signed_in(request)
        data = await form(request)
        if session is not None and hmac.compare_digest(data.get("csrf", ""), session.csrf):
            sessions.end(request.cookies.get(SESSION_COOKIE))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.get("/")
    def root():
        return RedirectResponse("/patients", status_code=303)

    @app.get("/patients", response_class=HTMLResponse)
    def patients(request: Request, q: str = "", page_no: int = 0):
        session = signed_in(request)
        if session is None:
            return to_login(request)
        size = settings.page_size
        try:
            rows, total = search(settings.data_dir, q.strip(), max(0, page_no), size)
        except NoStore as err:
            return page(request, "patients.html", 503, session=session, rows=[], total=0, q=q, page_no=0,
                        pages=0, error=str(err), modalities=MODALITIES)
        pages = max(1, -(-total // size))
        return page(request, "patients.html", session=session, rows=rows, total=total, q=q,
                    page_no=max(0, page_no), pages=pages, error="", modalities=MODALITIES)

    def _patient_page(request: Request, session: Session, pid: str, status: int = 200, **extra) -> HTMLResponse:
        request.state.audit = {"patient": pid, **getattr(request.state, "audit", {})}
        try:
            view = patient_view(settings.data_dir, pid)
        except (LookupError, NoStore) as err:
            return page(request, "error.html", 404, session=session, message=str(err))
        return page(request, "patient.html", status, session=session, p=view, modalities=MODALITIES,
                    cloud_on=ask_cloud is not None, **extra)

    @app.get("/patients/{pid}", response_class=HTMLResponse)
    def patient(request: Request, pid: str):
        session = signed_in(request)
        if session is None:
            return to_login(request)
        return _patient_page(request, session, pid)

    @app.get("/patients/{pid}/image.png")
    def patient_image(request: Request, pid: str):
        session = signed_in(request)
        if session is None:
            return Response(status_code=401)
        request.state.audit = {"patient": pid}
        try:
            return Response(image_png(settings.data_dir, pid), media_type="image/png",
                            headers={"Cache-Control": "no-store"})
        except (LookupError, NoStore) as err:
            return Response(str(err), status_code=404, media_type="text/plain")

    @app.post("/patients/{pid}/ask", response_class=HTMLResponse)
    async def ask(request: Request, pid: str):
        session = signed_in(request)
        if session is None:
            return to_login(request)
        data = await form(request)
        if not hmac.compare_digest(data.get("csrf", ""), session.csrf):
            log.warning("CSRF token mismatch for %s on %s", session.user, request.url.path)
            return page(request, "error.html", 403, session=session,
                        message="This form expired (CSRF check failed); reload the page and try again.")
        from starlette.concurrency import run_in_threadpool
        result = await run_in_threadpool(_ask, pid)
        request.state.audit = {"patient": pid, "cloud": result.get("cloud_status")}
        log.info("%s asked the cloud about a patient: %s", session.user, result.get("cloud_status"))
        return _patient_page(request, session, pid, status=200, result=result)

    def _ask(pid: str) -> dict:
        out: dict = {}
        try:
            out["edge"] = predict_patient(settings.data_dir, pid)
        except (LookupError, ValueError, OSError) as err:
            out["edge_error"] = str(err)
        if ask_cloud is None:
            out["cloud_error"], out["cloud_status"] = CLOUD_MESSAGES["off"], "off"
            return out
        t0 = time.monotonic()
        try:
            cloud = ask_cloud(Path(settings.data_dir), pid)
        except CloudError as err:
            log.warning("encrypted prediction for a patient failed: %s", err)
            out["cloud_error"], out["cloud_status"] = err.for_clinician(), err.kind
            return out
        cloud["wall_s"] = time.monotonic() - t0
        out["cloud"], out["cloud_status"] = cloud, "ok"
        return out

    return app
