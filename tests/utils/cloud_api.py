"""A coordinator and two parties as real `iomt cloud` processes on loopback (plain HTTP),
plus a schemathesis fuzzer that calls their OpenAPI operations with valid tokens, for the
API boundary tests and bench/fuzz_api.py."""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from protocols.auth import Signer, make_credentials
from iomt.supervisor import free_port, spawn_iomt, stop, wait_port

HOSPITALS = ["h1", "h2"]


class CloudServices:
    """Coordinator + parties 0 and 1 in ``root``; ``env`` adds IOMT_PARTY_* / IOMT_COORD_* settings."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root, self.env = root, env or {}
        self.registry = make_credentials(root / "creds", HOSPITALS, 2)
        (root / "model.json").write_text(json.dumps({"arch": "toy", "config": {}, "init_seed": 1,
                                                     "spec": [["w", [4, 3]], ["b", [3]]]}))
        self.party_ports = [free_port(), free_port()]
        self.coord_port = free_port()
        self.coord_url = f"http://127.0.0.1:{self.coord_port}"
        self.party_urls = [f"http://127.0.0.1:{p}" for p in self.party_ports]
        self.procs: dict[str, object] = {}

    def signer(self, principal: str) -> Signer:
        return Signer.from_file(self.root / "creds" / "keys" / f"{principal}.json")

    def start(self) -> "CloudServices":
        coord = ["cloud", "coordinator", "--data-dir", str(self.root / "coord"), "--listen",
                 f"127.0.0.1:{self.coord_port}", "--registry", str(self.registry), "--key-file",
                 str(self.root / "creds/keys/coordinator.json"), "--model", str(self.root / "model.json"),
                 "--rounds", "1", "--round-timeout", "3600", "--min-hospitals", "2"]
        for u in self.party_urls:
            coord += ["--party", u]
        self.procs["coord"] = spawn_iomt(*coord, log=self.root / "coord.log", env=self.env)
        for i, port in enumerate(self.party_ports):
            self.procs[f"party{i}"] = spawn_iomt(
                "cloud", "party", "--index", str(i), "--parties", "2", "--data-dir", str(self.root / f"party{i}"),
                "--listen", f"127.0.0.1:{port}", "--registry", str(self.registry),
                "--key-file", str(self.root / f"creds/keys/party-{i}.json"), "--coordinator", self.coord_url,
                log=self.root / f"party{i}.log", env=self.env)
        for port in [self.coord_port, *self.party_ports]:
            wait_port(port)
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            stop(proc)
        self.procs.clear()

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def metrics(self, url: str, audience: str) -> dict[str, int]:
        return httpx.get(f"{url}/metrics", headers=self.signer("coordinator" if audience != "coordinator"
                                                               else "party-0").headers(audience)).json()


#: Which principal calls which operation, so that fuzzed requests reach the handlers.
def caller(path: str, method: str) -> str | None:
    if path in ("/health", "/inference/v1/status"):
        return None
    if path in ("/metrics",):
        return "party-0"
    if path.endswith("/receipts") or path.endswith("/aggregate"):
        return "coordinator"
    return "h1"


@dataclass
class FuzzCounts:
    cases: int = 0
    crashes: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)
    undeclared: collections.Counter = field(default_factory=collections.Counter)

    def add(self, other: "FuzzCounts") -> None:
        self.cases += other.cases
        self.crashes += other.crashes
        self.by_status.update(other.by_status)
        self.server_errors += other.server_errors
        self.undeclared.update(other.undeclared)


def fuzz_service(base_url: str, audience: str, signers: dict[str, Signer], examples: int,
                 seed: int = 0) -> FuzzCounts:
    """Run schemathesis cases (positive and negative) against every operation of one service.

    Every case carries a fresh valid token for ``audience`` from the operation's caller. A
    crash is a request that got no HTTP answer; ``server_errors`` lists every 5xx.
    """
    import hypothesis
    import hypothesis.errors
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    counts = FuzzCounts()
    session = requests.Session()
    for result in schema.get_all_operations():
        op = result.ok()
        who = caller(op.path, op.method.upper())
        declared = {str(code) for code in op.definition.raw.get("responses", {})}
        for mode in schemathesis.GenerationMode:

            @hypothesis.settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                                 suppress_health_check=list(HealthCheck), derandomize=False)
            @hypothesis.seed(seed)
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:
                headers = signers[who].headers(audience) if who else {}
                counts.cases += 1
                try:
                    resp = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
                except requests.RequestException as err:
                    counts.crashes += 1
                    counts.server_errors.append(f"{case.method} {case.formatted_path}: no answer: {err}")
                    return
                counts.by_status[resp.status_code] += 1
                if str(resp.status_code) not in declared and resp.status_code != 405:
                    counts.undeclared[f"{case.method} {op.path} {resp.status_code}"] += 1
                if resp.status_code >= 500:
                    counts.server_errors.append(f"{case.method} {case.formatted_path}: {resp.status_code} "
                                                f"{resp.text[:200]}")

            try:
                run()
            except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (no parameters)
                pass
    return counts


def fuzz_cloud(services: CloudServices, examples: int, seed: int = 0) -> dict[str, FuzzCounts]:
    """Fuzz party 0 and the coordinator; ``{service: counts}``."""
    signers = {p: services.signer(p) for p in ("h1", "coordinator", "party-0")}
    return {"party-0": fuzz_service(services.party_urls[0], "party-0", signers, examples, seed),
            "coordinator": fuzz_service(services.coord_url, "coordinator", signers, examples, seed)}
