"""A party's durable store: uploaded shares per round, round configs, and the
secret-shared global model versions.

Layout under the party's data dir ``D``::

    D/rounds/r{round:06d}/config.json           round config fetched from the coordinator
    D/rounds/r{round:06d}/{hospital}.share      upload exactly as received (wire format)
    D/rounds/r{round:06d}/{hospital}.json       receipt: sample count, sha256, sharing id (written last)
    D/global/v{version:06d}/share.npz           this party's int64 share of S = sum n_k theta_k
    D/global/v{version:06d}/meta.json           version, round, parties, denominator, spec, ...
    D/global/LATEST                             the newest version number

Every write is temp file + fsync + rename + fsync of the directory, so an acknowledged
upload or a published version survives a crash. Files are created 0600 and the folders
this store makes 0700: a share is readable by the party's own user only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from protocols.aggregation_messages import Receipt, RoundConfig, Upload, upload_from_wire
from protocols.auth import check_principal_id
from protocols.errors import IomtError, Refusal
from protocols.model_files import GlobalModelMeta

#: Mode of the folders the store creates (files are 0600: mkstemp, or _create_private).
DIR_MODE = 0o700


class StoreError(IomtError):
    """The store could not read or write (disk full, I/O error, permissions): a failure of this
    host, not of the request. Refused requests raise :class:`UploadRefused` instead."""


class UploadRefused(Refusal):
    """An upload or a stored object that the store refuses (``replay``, ``bad_id``)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) so that it is either absent or complete after a crash;
    :class:`StoreError` if the disk refuses."""
    try:
        _atomic_write(path, data)
    except OSError as err:
        raise StoreError(f"cannot write {path}: {err}") from err


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _create_private(path: Path):
    """A new file opened for binary writing, mode 0600 whatever the umask."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def check_id(hospital: str) -> str:
    """``hospital`` if it is a plain principal id (protocols.auth.PRINCIPAL_ID), else UploadRefused."""
    try:
        return check_principal_id(hospital)
    except ValueError as err:
        raise UploadRefused("bad_id", f"hospital id {hospital!r} is not a safe name") from err


class PartyStore:
    """Everything one party keeps on disk."""

    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir)
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        (self.root / "rounds").mkdir(exist_ok=True, mode=DIR_MODE)
        (self.root / "global").mkdir(exist_ok=True, mode=DIR_MODE)

    def _round_dir(self, rnd: int) -> Path:
        return self.root / "rounds" / f"r{rnd:06d}"

    # round configs -------------------------------------------------------------------
    def save_config(self, cfg: RoundConfig) -> None:
        atomic_write(self._round_dir(cfg.round) / "config.json", cfg.model_dump_json().encode())

    def load_config(self, rnd: int) -> RoundConfig | None:
        path = self._round_dir(rnd) / "config.json"
        return RoundConfig.model_validate_json(path.read_bytes()) if path.exists() else None

    # uploads -------------------------------------------------------------------------
    def has_upload(self, rnd: int, hospital: str) -> bool:
        return (self._round_dir(rnd) / f"{check_id(hospital)}.json").exists()

    def receipt(self, rnd: int, hospital: str) -> Receipt | None:
        path = self._round_dir(rnd) / f"{check_id(hospital)}.json"
        return Receipt.model_validate_json(path.read_bytes()) if path.exists() else None

    def held(self, rnd: int, hospital: str, raw: bytes) -> Receipt | None:
        """The receipt of the upload already stored for (round, hospital) if it is ``raw`` itself
        (a retry: answer it again); :class:`UploadRefused` ``replay`` if a different one is stored."""
        old = self.receipt(rnd, hospital)
        if old is None:
            return None
        if old.sha256 != hashlib.sha256(raw).hexdigest():
            raise UploadRefused("replay", f"{hospital} already uploaded a different share for round {rnd} "
                             f"(sharing {old.commitment[:12]}); a retry must resend the same bytes")
        return old

    def save_upload(self, upload: Upload, raw: bytes) -> Receipt:
        """Store one decoded upload durably; refuses a second upload for the same round (a caller
        answers a resent identical one from :meth:`held` first)."""
        h = upload.header
        if self.has_upload(h.round, h.hospital):
            raise UploadRefused("replay", f"{h.hospital} already uploaded for round {h.round}")
        digest = hashlib.sha256(raw).hexdigest()
        rdir = self._round_dir(h.round)
        atomic_write(rdir / f"{h.hospital}.share", raw)
        receipt = Receipt(hospital=h.hospital, n_samples=h.n_samples, sha256=digest, commitment=h.sharing_id())
        atomic_write(rdir / f"{h.hospital}.json", receipt.model_dump_json().encode())
        return receipt

    def receipts(self, rnd: int) -> list[Receipt]:
        rdir = self._round_dir(rnd)
        if not rdir.exists():
            return []
        return [Receipt.model_validate_json(p.read_bytes()) for p in sorted(rdir.glob("*.json"))
                if p.name != "config.json"]

    def load_upload(self, rnd: int, hospital: str) -> Upload:
        return upload_from_wire((self._round_dir(rnd) / f"{check_id(hospital)}.share").read_bytes())

    # global model --------------------------------------------------------------------
    def global_dir(self, version: int) -> Path:
        return self.root / "global" / f"v{version:06d}"

    def write_global(self, version: int, arrays: dict[str, np.ndarray], meta: GlobalModelMeta) -> str:
        """Publish version ``version`` atomically; returns the sha256 of ``share.npz``."""
        final = self.global_dir(version)
        if final.exists():
            return file_sha256(final / "share.npz")
        tmp = Path(tempfile.mkdtemp(dir=self.root / "global", prefix=f".v{version:06d}."))  # 0700
        try:
            with _create_private(tmp / "share.npz") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            with _create_private(tmp / "meta.json") as f:
                f.write(meta.to_json().encode())
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(final.parent)
        latest = latest_version(self.root)
        if latest is None or version > latest:
            atomic_write(self.root / "global" / "LATEST", f"{version}\n".encode())
        return file_sha256(final / "share.npz")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def latest_version(data_dir: str | Path) -> int | None:
    path = Path(data_dir) / "global" / "LATEST"
    return int(path.read_text().strip()) if path.exists() else None


def load_global_share(data_dir: str | Path, version: int | None = None) -> tuple[GlobalModelMeta, dict[str, np.ndarray]]:
    """``(meta, {name: int64 share})`` of a published global version (the newest by default).

    The share is this party's additive share in Z_2^64 (16 fractional bits) of
    ``S = sum_k n_k theta_k``; the model is ``S / meta.denominator``.
    """
    root = Path(data_dir)
    version = latest_version(root) if version is None else version
    if version is None:
        raise FileNotFoundError(f"no global model published under {root}")
    vdir = root / "global" / f"v{version:06d}"
    meta = GlobalModelMeta.from_json((vdir / "meta.json").read_bytes())
    with np.load(vdir / "share.npz") as z:
        arrays = {name: z[name].astype(np.int64, copy=False) for name, _ in meta.spec}
    return meta, arrays
