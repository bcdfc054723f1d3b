"""Credentials for hospitals, parties and the coordinator: Ed25519-signed tokens, a
registry of principals with a revocation list. (TLS certificates: :mod:`protocols.pki`.)

A token is ``base64url(claims JSON) "." base64url(Ed25519 signature)``; the claims name the
subject (``sub``), its role, the audience (the one service it is for, so a party cannot
replay a hospital's token to another party), issue and expiry times and a nonce. The
verifier looks the subject up in a :class:`Registry` (public keys and revocations, a JSON
file re-read when it changes, so revoking needs no restart), type-checks every claim and
caps the lifetime ``exp - iat`` itself, whatever the holder asked for.

Principal ids (hospitals, ``party-<i>``, the coordinator) are plain identifiers
(:data:`PRINCIPAL_ID`): they name key files and store paths, so ``..`` or ``/`` never pass.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocols.errors import ConfigError, Refusal

log = logging.getLogger(__name__)

ROLES = ("hospital", "party", "coordinator")
#: Lifetime a :class:`Signer` gives its tokens.
TOKEN_TTL_S = 300.0
#: Longest lifetime (``exp - iat``) a verifier accepts, whatever the token says; services
#: take theirs from their settings (``max_token_ttl``).
MAX_TOKEN_TTL_S = 600.0
CLOCK_SKEW_S = 30.0
#: Largest token accepted (characters); a real one is about 250.
MAX_TOKEN_CHARS = 2048
#: A principal id: letters, digits, ``_ . -``, starting with a letter or digit, at most 64
#: characters, never ``..``. One rule for the registry, the credentials CLI and the stores.
PRINCIPAL_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_principal_id(pid: object) -> str:
    """``pid`` if it is a plain principal id (:data:`PRINCIPAL_ID`), else :class:`ValueError`."""
    if not isinstance(pid, str) or not PRINCIPAL_ID.fullmatch(pid):
        raise ValueError(f"{pid!r} is not a plain id (letters, digits, _ . -; at most 64; no '..')")
    return pid


class AuthError(Refusal):
    """A credential was refused. ``reason`` is a slug (``malformed_token``, ``unknown_principal``,
    ``bad_signature``, ``revoked``, ``wrong_role``, ``wrong_audience``, ``bad_lifetime``,
    ``expired``, ``missing_token``, ``token_too_long``, ``wrong_hospital``), ``detail`` the text
    for people and ``status`` 401 (who are you?) or 403 (not allowed). An HTTP refusal's
    ``error`` stays ``unauthorized``/``forbidden`` (by ``status``), its ``detail`` is ``str(err)``.
    """

    def __init__(self, reason: str, detail: str = "", status: int = 401) -> None:
        super().__init__(reason, detail)
        self.status = status

    @property
    def http_error(self) -> str:
        """The ``error`` of the HTTP error body: ``unauthorized`` (401) or ``forbidden`` (403)."""
        return "unauthorized" if self.status == 401 else "forbidden"


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Claims(BaseModel):
    """A token's claims, type-checked: a list or object where a string belongs is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    sub: str = Field(max_length=64)
    role: Literal["hospital", "party", "coordinator"]
    aud: str = Field(max_length=64)
    iat: float
    exp: float
    nonce: str = Field(max_length=64)

    @field_validator("sub")
    @classmethod
    def _plain(cls, v: str) -> str:
        return check_principal_id(v)

    @field_validator("iat", "exp")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("times must be finite")
        return v


class Signer:
    """Holds one principal's private key and mints short-lived tokens."""

    def __init__(self, principal: str, role: str, key: Ed25519PrivateKey) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        self.principal, self.role, self._key = principal, role, key

    @classmethod
    def from_file(cls, path: str | Path) -> "Signer":
        """Load a key file written by :func:`make_credentials` (JSON: id, role, private key PEM)."""
        data = json.loads(Path(path).read_text())
        key = serialization.load_pem_private_key(data["private_key"].encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("credential key must be Ed25519")
        return cls(data["id"], data["role"], key)

    def token(self, audience: str, ttl: float = TOKEN_TTL_S) -> str:
        now = time.time()
        claims = {"sub": self.principal, "role": self.role, "aud": audience, "iat": now,
                  "exp": now + ttl, "nonce": secrets.token_hex(8)}
        body = _b64e(json.dumps(claims, separators=(",", ":")).encode())
        return f"{body}.{_b64e(self._key.sign(body.encode()))}"

    def headers(self, audience: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(audience)}"}


class Registry:
    """Public keys and roles of every principal, plus revocations, from a JSON file.

    File format: ``{"principals": {id: {"role": r, "public_key": PEM}}, "revoked": [id, ...]}``.
    A hospital's entry may declare ``"max_samples": N``, the most samples it may claim per
    round (:meth:`max_samples`; see :func:`declare_max_samples`).
    """

    def __init__(self, path: str | Path, max_ttl: float = MAX_TOKEN_TTL_S) -> None:
        self.path = Path(path)
        #: longest token lifetime accepted (seconds), plus :data:`CLOCK_SKEW_S`
        self.max_ttl = max_ttl
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._keys: dict[str, tuple[str, Ed25519PublicKey]] = {}
        self._revoked: set[str] = set()
        self._max_samples: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        """Read the file; :class:`ConfigError` if it is unreadable or names a bad principal."""
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime == self._mtime:
                return
            data = json.loads(self.path.read_text())
            keys, caps = {}, {}
            for pid, entry in data.get("principals", {}).items():
                check_principal_id(pid)
                if entry["role"] not in ROLES:
                    raise ValueError(f"{pid}: unknown role {entry['role']!r}")
                pub = serialization.load_pem_public_key(entry["public_key"].encode())
                if not isinstance(pub, Ed25519PublicKey):
                    raise ValueError(f"{pid}: public key is not Ed25519")
                keys[pid] = (entry["role"], pub)
                cap = entry.get("max_samples")
                if cap is not None:
                    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
                        caps[pid] = cap
                    else:  # one bad declaration must not stop authentication for everybody
                        log.error("registry %s: %s's max_samples %r is not a positive integer; ignored",
                                  self.path, pid, cap)
            revoked = set(data.get("revoked", []))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"registry {self.path}: {err}") from err
        self._keys, self._revoked, self._mtime = keys, revoked, mtime
        self._max_samples = caps

    def _reload(self) -> None:
        """Pick up an edited registry; a broken edit keeps the last good one (with a warning)."""
        try:
            self._load()
        except ConfigError as err:
            log.warning("keeping the previous registry: %s", err)

    def principals(self, role: str | None = None) -> list[str]:
        with self._lock:
            self._reload()
            return sorted(p for p, (r, _) in self._keys.items() if role in (None, r) and p not in self._revoked)

    def max_samples(self, principal: str) -> int | None:
        """The per-round sample count ``principal`` declared in the registry (None: not declared)."""
        with self._lock:
            self._reload()
            return self._max_samples.get(principal)

    def verify(self, token: str, audience: str, roles: tuple[str, ...]) -> Claims:
        """The token's claims, or :class:`AuthError` (401 unknown/bad/expired, 403 revoked/role)."""
        with self._lock:
            self._reload()
            keys, revoked = self._keys, self._revoked
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("token_too_long", f"token longer than {MAX_TOKEN_CHARS} characters")
        try:
            body, sig = token.split(".")
            claims = Claims.model_validate_json(_b64d(body))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "claims"
            raise AuthError("malformed_token", f"malformed token: {where}: {first['msg']}") from err
        except ValueError as err:
            raise AuthError("malformed_token", "malformed token") from err
        entry = keys.get(claims.sub)
        if entry is None:
            raise AuthError("unknown_principal", f"unknown principal {claims.sub!r}")
        role, pub = entry
        try:
            pub.verify(_b64d(sig), body.encode())
        except (InvalidSignature, ValueError) as err:
            raise AuthError("bad_signature", "bad signature") from err
        if claims.sub in revoked:
            raise AuthError("revoked", f"{claims.sub!r} is revoked", 403)
        if claims.role != role or role not in roles:
            raise AuthError("wrong_role", f"role {role!r} may not do this", 403)
        if claims.aud != audience:
            raise AuthError("wrong_audience", f"token is for {claims.aud!r}, not {audience!r}")
        if not 0 < claims.exp - claims.iat <= self.max_ttl + CLOCK_SKEW_S:
            raise AuthError("bad_lifetime", f"token lifetime {claims.exp - claims.iat:.0f}s is not in (0, {self.max_ttl:.0f}s]")
        now = time.time()
        if claims.exp < now - CLOCK_SKEW_S or claims.iat > now + CLOCK_SKEW_S:
            raise AuthError("expired", "token expired or not yet valid")
        return claims

    def verify_header(self, header: str | None, audience: str, roles: tuple[str, ...]) -> Claims:
        if not header or not header.startswith("Bearer "):
            raise AuthError("missing_token", "missing bearer token")
        return self.verify(header[len("Bearer "):], audience, roles)


def _write_private(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o600)


def make_credentials(out: str | Path, hospitals: list[str], parties: int,
                     coordinator: str = "coordinator") -> Path:
    """Write an Ed25519 key file per principal (``keys/<id>.json``) and ``registry.json``.

    Parties are named ``party-<i>``. Returns the registry path.
    """
    out = Path(out)
    names = [(h, "hospital") for h in hospitals] + [(f"party-{i}", "party") for i in range(parties)]
    names.append((coordinator, "coordinator"))
    for pid, _ in names:  # before writing anything: an id names a file under keys/
        check_principal_id(pid)
    if len({pid for pid, _ in names}) != len(names):
        raise ValueError("principal ids must be distinct")
    (out / "keys").mkdir(parents=True, exist_ok=True, mode=0o700)
    principals = {}
    for pid, role in names:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        _write_private(out / "keys" / f"{pid}.json", json.dumps({"id": pid, "role": role, "private_key": pem}))
        pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        principals[pid] = {"role": role, "public_key": pub}
    registry = out / "registry.json"
    registry.write_text(json.dumps({"principals": principals, "revoked": []}, indent=1))
    return registry


def revoke(registry: str | Path, principal: str) -> None:
    """Add ``principal`` to the registry's revocation list (atomic rewrite)."""
    check_principal_id(principal)
    path = Path(registry)
    data = json.loads(path.read_text())
    data["revoked"] = sorted(set(data.get("revoked", [])) | {principal})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def declare_max_samples(registry: str | Path, principal: str, max_samples: int | None) -> None:
    """Set (or with None remove) ``principal``'s declared per-round sample maximum (atomic rewrite)."""
    path = Path(registry)
    data = json.loads(path.read_text())
    entry = data.get("principals", {}).get(principal)
    if entry is None or entry.get("role") != "hospital":
        raise ValueError(f"{principal!r} is not a hospital in {path}")
    if max_samples is None:
        entry.pop("max_samples", None)
    elif max_samples < 1:
        raise ValueError("max_samples must be >= 1")
    else:
        entry["max_samples"] = int(max_samples)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def make_tls(out: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
             days: int = 30) -> dict[str, Path]:
    """A CA and ONE server certificate for ``hosts``, for a single service such as the MQTT
    broker; returns the PEM paths ``ca`` (for clients' ``verify``), ``cert`` and ``key``.

    The cloud services each get their own key and certificate instead (:mod:`protocols.pki`).
    """
    from protocols.pki import issue_local

    _, hosts_files = issue_local(out, [("service", "service")], hosts, days=days)
    files = hosts_files["service"]
    for folder in (Path(out), files.dir.parent, files.dir):  # a broker dropping to its own user must
        folder.chmod(0o755)                                   # reach the files; the key itself stays 0600
    return {"ca": files.ca, "cert": files.tls_cert, "key": files.tls_key}
