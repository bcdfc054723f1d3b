"""`iomt cloud restore`: unpack an `iomt cloud backup` archive onto a fresh host.

Every file's sha256 is checked against the manifest before anything is written; the data dir
must be absent or empty (restoring over live state would mix two times). Folders are made
0700 and files 0600, as the services make them; run it as the service's user (``iomt``), or
``chown -R iomt:iomt`` after. Start the service only after the restore.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tarfile
from pathlib import Path, PurePosixPath

from cloud_aggregator.backup import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, FORMAT, BackupError

log = logging.getLogger(__name__)


def _read(archive: Path) -> tuple[dict, dict[str, bytes]]:
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    raise BackupError(f"{archive}: {member.name} is not a plain file")
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts or not path.parts:
                    raise BackupError(f"{archive}: unsafe path {member.name!r}")
                files[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BackupError(f"{archive}: not a readable backup ({err})") from err
    try:
        manifest = json.loads(files.pop("manifest.json"))
    except (KeyError, ValueError) as err:
        raise BackupError(f"{archive}: no readable manifest.json") from err
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{archive}: backup format {manifest.get('format')!r}, this version reads {FORMAT}")
    listed = manifest.get("files", {})
    if set(listed) != set(files):
        raise BackupError(f"{archive}: files and manifest differ: {sorted(set(listed) ^ set(files))[:5]}")
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != listed[name]["sha256"]:
            raise BackupError(f"{archive}: {name} is damaged (sha256 differs from the manifest)")
    return manifest, files


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def restore_backup(archive: Path, data_dir: Path, etc: Path | None = None) -> dict:
    """Check ``archive`` whole, then write its ``data/`` into ``data_dir`` (and ``etc/`` into ``etc``)."""
    manifest, files = _read(archive)
    for target in (data_dir, etc):
        if target is not None and target.exists() and any(target.iterdir()):
            raise BackupError(f"{target} is not empty: restore onto a fresh folder (stop the service, move it away)")
    tops = {"data": data_dir, "etc": etc}
    if etc is None and any(n.startswith("etc/") for n in files):
        log.warning("%s holds settings (etc/); not restored without --etc", archive)
    for top, root in tops.items():
        if root is not None:
            _write_tree(root, {n[len(top) + 1:]: d for n, d in files.items() if n.startswith(f"{top}/")})
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", type=Path, help="an `iomt cloud backup` archive")
    parser.add_argument("--data-dir", required=True, type=Path, help="the new data dir (absent or empty)")
    parser.add_argument("--etc", type=Path, help="restore the archive's settings folder here (absent or empty)")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = restore_backup(args.archive, args.data_dir, args.etc)
    except BackupError as err:
        log.error("restore refused: %s", err)
        return EXIT_CONFIG
    except OSError as err:
        log.error("restore failed: %s", err)
        return EXIT_FAILED
    print(f"{args.data_dir}: {manifest['role']} state restored ({len(manifest['files'])} files)")
    return EXIT_OK
