"""Schemathesis against the cloud services' OpenAPI, with valid tokens, counted.

Starts a coordinator and two parties as real `iomt cloud` processes on loopback (plain HTTP,
a test registry), then runs positive and negative schemathesis cases (hypothesis) against every
operation of party 0 and of the coordinator; each case carries a fresh valid token of the
principal the operation expects (hospital h1, the coordinator, or party-0), so that it reaches
the handlers rather than stopping at 401. Prints the number of cases, crashes (no HTTP answer),
answers by status, every 5xx, and statuses the operation does not declare in its OpenAPI.

These parties run without an MPC group: ``POST /inference/v1/predict`` answers 404
``not_configured`` there.

Run: python bench/fuzz_api.py [--examples 150] [--seed 0] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.api_fuzz import fuzz_cloud  # noqa: E402
from iomt.local_cloud import LocalCloud  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=150, help="hypothesis examples per operation and mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz_api.") as tmp:
        services = LocalCloud.api(Path(tmp)).start()
        t0 = time.perf_counter()
        try:
            results = fuzz_cloud(services, args.examples, args.seed)
            alive = services.alive()
            tracebacks = sum(services.log(n).count("Traceback") for n in ("party-0", "party-1", "coordinator"))
        finally:
            services.stop()
        seconds = time.perf_counter() - t0
    report = {"examples_per_operation_and_mode": args.examples, "seed": args.seed, "seconds": round(seconds, 1),
              "services_alive_after": alive, "tracebacks_in_logs": tracebacks, "services": {}}
    for name, c in results.items():
        report["services"][name] = {
            "cases": c.cases, "crashes": c.crashes,
            "by_status": {str(k): v for k, v in sorted(c.by_status.items())},
            "5xx": sum(v for k, v in c.by_status.items() if k >= 500),
            "5xx_answers": c.server_errors[:20],
            "undeclared_status": dict(c.undeclared)}
    total = sum(s["cases"] for s in report["services"].values())
    report["total_cases"] = total
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{total} cases in {seconds:.0f}s (examples/operation/mode {args.examples}, seed {args.seed}); "
              f"services alive after: {alive}; tracebacks in logs: {tracebacks}")
        for name, s in report["services"].items():
            print(f"  {name}: {s['cases']} cases, {s['crashes']} crashes, 5xx {s['5xx']}, "
                  f"by status {s['by_status']}, undeclared {s['undeclared_status'] or 'none'}")
            for e in s["5xx_answers"]:
                print(f"    {e[:300]}")
    bad = any(s["crashes"] or s["5xx"] for s in report["services"].values()) or not alive or tracebacks
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
