"""`iomt cloud backup`: a consistent copy of a party's or the coordinator's state, taken while it runs.

What a party or coordinator needs to carry on elsewhere is its data dir (``--data-dir``) and
its ``/etc/iomt`` (settings file, its own key, the registry, TLS files): ``--etc`` adds the
latter to the archive. Nothing else is kept by these services (no database: every file of the
data dir is written whole, to a temporary name, and renamed, see :mod:`cloud_aggregator.store`).

So a copy taken while the service runs is consistent if it follows the writers' order:

- temporary files and folders (a leading ``.``) are left out: a write in progress;
- an upload (``rounds/r*/H.share``) is copied only with its receipt (``H.json``, written last);
  one without is an upload not yet acknowledged, which the hospital sends again;
- ``global/LATEST`` is written into the archive as the newest complete version it holds
  (version folders appear whole, by rename, before LATEST moves on);
- append-only logs (``audit/*.jsonl``) are cut at their last complete line.

The archive (tar, gzip) holds ``manifest.json`` (every file's size and sha256), ``data/`` and,
with ``--etc``, ``etc/``. `iomt cloud restore` checks every hash before writing anything.
Keys are secret: keep the archive as you keep ``/etc/iomt/keys`` (mode 0600, encrypted at rest).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
FORMAT = 1
_VERSION_DIR = re.compile(r"v(\d{6})")


class BackupError(Exception):
    """The archive cannot be made or restored (named path, reason)."""


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _snapshot(data_dir: Path) -> dict[str, bytes]:
    """Relative path -> contents of what to keep from ``data_dir`` (see the module docstring)."""
    files: dict[str, bytes] = {}
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir)
        if _hidden(rel) or not path.is_file() or path.is_symlink():
            continue
        if rel.parts[0] == "rounds" and path.suffix == ".share" and not path.with_suffix(".json").exists():
            log.info("left out %s: not acknowledged yet (no receipt)", rel)
            continue
        if rel == Path("global/LATEST"):
            continue  # recomputed below from the versions copied
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # replaced or removed as we went: a newer copy is (or was) elsewhere
            continue
        if path.suffix == ".jsonl":
            data = data[:data.rfind(b"\n") + 1]
        files[rel.as_posix()] = data
    # a receipt copied after its share was listed (the upload landed mid-walk): take the share too
    for name in [n for n in files if n.startswith("rounds/") and n.endswith(".json") and not n.endswith("config.json")]:
        share = name[:-5] + ".share"
        if share not in files and (data_dir / share).exists():
            files[share] = (data_dir / share).read_bytes()
    versions = sorted(int(m.group(1)) for name in files
                      if (m := _VERSION_DIR.fullmatch(Path(name).parent.name)) and name.endswith("/meta.json")
                      and name.startswith("global/") and name[:-9] + "share.npz" in files)
    if versions:
        files["global/LATEST"] = f"{versions[-1]}\n".encode()
    return files


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def make_backup(data_dir: Path, out: Path, etc: Path | None = None) -> dict:
    """Write the archive ``out`` of ``data_dir`` (and ``etc``); returns the manifest."""
    if not data_dir.is_dir():
        raise BackupError(f"{data_dir} is not a folder")
    parts = {"data": _snapshot(data_dir)}
    if etc is not None:
        if not etc.is_dir():
            raise BackupError(f"{etc} is not a folder")
        parts["etc"] = {p.relative_to(etc).as_posix(): p.read_bytes() for p in sorted(etc.rglob("*"))
                        if p.is_file() and not _hidden(p.relative_to(etc))}
    role = ("coordinator" if "coordinator_state.json" in parts["data"] else
            "party" if any(n.startswith(("rounds/", "global/")) for n in parts["data"]) else "unknown")
    manifest = {"format": FORMAT, "role": role, "created": time.time(), "source": str(data_dir),
                "files": {f"{top}/{name}": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for top, files in parts.items() for name, data in files.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            _add(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
            for top, files in parts.items():
                for name, data in files.items():
                    _add(tar, f"{top}/{name}", data)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path, help="the party's or coordinator's data dir")
    parser.add_argument("--out", required=True, type=Path, help="archive to write (tar.gz, mode 0600)")
    parser.add_argument("--etc", type=Path, help="also keep this settings folder (/etc/iomt: config, keys, "
                                                 "registry, TLS files)")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = make_backup(args.data_dir, args.out, args.etc)
    except (BackupError, OSError) as err:
        log.error("backup failed: %s", err)
        return EXIT_FAILED
    print(f"{args.out}: {manifest['role']} state, {len(manifest['files'])} files")
    return EXIT_OK
