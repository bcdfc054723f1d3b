"""A schemathesis fuzzer that calls every OpenAPI operation of a coordinator and a party
(:meth:`iomt.local_cloud.LocalCloud.api`) with valid tokens, for the API boundary tests and
bench/fuzz_api.py."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from protocols.auth import Signer


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


def fuzz_cloud(services, examples: int, seed: int = 0) -> dict[str, FuzzCounts]:
    """Fuzz party 0 and the coordinator; ``{service: counts}``."""
    signers = {p: services.signer(p) for p in ("h1", "coordinator", "party-0")}
    return {"party-0": fuzz_service(services.party_urls[0], "party-0", signers, examples, seed),
            "coordinator": fuzz_service(services.coord_url, "coordinator", signers, examples, seed)}
