"""What the deploy/ tests share: where the files are, what a settings file needs mounted,
and the throwaway operator files (keys, certificates, WireGuard config) a build needs."""
from __future__ import annotations

import base64
import os
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
#: The image's user (deploy/docker/Dockerfile: useradd --uid, USER).
IOMT_UID = 10001


def settings_file(host: str, role: str) -> Path:
    return DEPLOY / "config" / host / f"{role}.toml"


def etc_paths(toml: Path) -> set[str]:
    """Every /etc/iomt/... path a settings file names (keys, certificates, registry, model)."""
    found: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.startswith("/etc/iomt/"):
            found.add(value)

    walk(tomllib.loads(toml.read_text()))
    return found


def data_dir(toml: Path) -> str | None:
    return tomllib.loads(toml.read_text()).get("data_dir")


def covered(path: str, mounts: dict[str, str]) -> bool:
    """Whether ``path`` lies on one of the mount targets (a file mount or a directory above it)."""
    return any(path == target or path.startswith(target.rstrip("/") + "/") for target in mounts)


def throwaway_wireguard_conf() -> str:
    """A wg(8) config with random keys: enough for a build, useless for anything else."""
    def key() -> str:
        return base64.b64encode(os.urandom(32)).decode()

    return (f"[Interface]\nPrivateKey = {key()}\nListenPort = 51820\n\n"
            f"[Peer]\nPublicKey = {key()}\nAllowedIPs = 10.99.0.2/32\nEndpoint = 192.0.2.1:51820\n")
