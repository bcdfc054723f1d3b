"""Peak memory of a party receiving one large chunked upload (no Content-Length).

Starts a coordinator and two parties as real processes (iomt/local_cloud.py), reads
party 0's resident memory (VmRSS) from /proc, streams ``--body-mib`` MiB of zeros in 1 MiB
chunks to ``PUT /rounds/1/share`` with a valid hospital token, and reads the party's peak
resident memory (VmHWM) afterwards. With ``--limit-mib`` the party's max_upload_bytes is set
below the body, so it must refuse with 413 while the body streams in.

Run: python bench/bench_body_limit.py [--body-mib 400] [--limit-mib 64]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iomt.local_cloud import LocalCloud  # noqa: E402


def _proc_kib(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--body-mib", type=int, default=400)
    parser.add_argument("--limit-mib", type=int, help="party max_upload_bytes in MiB (default: the setting's)")
    args = parser.parse_args()
    env = {"IOMT_PARTY_MAX_UPLOAD_BYTES": str(args.limit_mib << 20)} if args.limit_mib else {}
    block = b"\0" * (1 << 20)
    with tempfile.TemporaryDirectory(prefix="body_limit.") as tmp:
        services = LocalCloud.api(Path(tmp), env=env).start()
        try:
            pid = services.procs["party-0"].pid
            time.sleep(1.0)
            rss0 = _proc_kib(pid, "VmRSS")
            t0 = time.perf_counter()
            try:
                resp = httpx.put(f"{services.party_urls[0]}/rounds/1/share",
                                 content=(block for _ in range(args.body_mib)),
                                 headers=services.signer("h1").headers("party-0"), timeout=600)
                answer = f"{resp.status_code} {resp.text[:120]}"
            except httpx.HTTPError as err:
                answer = f"no answer: {err!r}"
            seconds = time.perf_counter() - t0
            peak = _proc_kib(pid, "VmHWM")
            alive = services.alive() and httpx.get(f"{services.party_urls[0]}/health").status_code == 200
        finally:
            services.stop()
    print(f"body {args.body_mib} MiB chunked, limit {args.limit_mib or 'default'} MiB: answer {answer}; "
          f"party RSS before {rss0 / 1024:.0f} MiB, peak after {peak / 1024:.0f} MiB "
          f"(+{(peak - rss0) / 1024:.0f} MiB); {seconds:.1f}s; party serving after: {alive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
