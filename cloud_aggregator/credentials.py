"""`iomt cloud credentials`: the keys, registry and TLS certificates of a federation.

Writes an Ed25519 key file per principal (``keys/<id>.json``: each hospital, ``party-<i>``
and ``coordinator``), the public ``registry.json`` every service verifies tokens against,
and (with ``--tls-host``) a CA plus one server certificate for those host names. Hand each
principal its own key file only; ``registry.json`` and ``tls/ca.pem`` are public.
`iomt cloud credentials --revoke ID --out DIR` adds ID to the registry's revocation list;
`iomt cloud credentials --max-samples ID=N --out DIR` declares the most samples hospital ID
may claim per round (parties refuse larger claims); services re-read the registry when it
changes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from protocols.auth import declare_max_samples, make_credentials, make_tls, revoke


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for keys/, registry.json and tls/")
    parser.add_argument("--hospitals", help="comma-separated hospital ids")
    parser.add_argument("--parties", type=int, default=2, help="number of cloud parties")
    parser.add_argument("--tls-host", action="append", default=[],
                        help="host name or IP the cloud services are reached at (repeat); makes tls/")
    parser.add_argument("--days", type=int, default=365, help="validity of the TLS certificates")
    parser.add_argument("--revoke", metavar="ID", help="revoke this principal in an existing registry")
    parser.add_argument("--max-samples", metavar="ID=N", action="append", default=[],
                        help="declare hospital ID's largest per-round sample count in an existing registry "
                             "(repeat; N=none removes it)")


def run(args: argparse.Namespace) -> int:
    registry = args.out / "registry.json"
    if args.revoke:
        if not registry.exists():
            print(f"error: no registry at {registry}", file=sys.stderr)
            return 2
        revoke(registry, args.revoke)
        print(f"revoked {args.revoke} in {registry}")
        return 0
    if args.max_samples:
        if not registry.exists():
            print(f"error: no registry at {registry}", file=sys.stderr)
            return 2
        for item in args.max_samples:
            pid, _, value = item.partition("=")
            try:
                declare_max_samples(registry, pid, None if value.lower() == "none" else int(value))
            except ValueError as err:
                print(f"error: --max-samples {item}: {err}", file=sys.stderr)
                return 2
            print(f"{pid} may claim at most {value} samples per round")
        return 0
    hospitals = [h for h in (args.hospitals or "").split(",") if h]
    if not hospitals or args.parties < 2:
        print("error: give --hospitals a,b,... and --parties >= 2", file=sys.stderr)
        return 2
    if registry.exists():
        print(f"error: {registry} exists; refusing to replace the federation's keys", file=sys.stderr)
        return 2
    make_credentials(args.out, hospitals, args.parties)
    print(f"keys for {len(hospitals)} hospitals, {args.parties} parties and the coordinator in {args.out / 'keys'}")
    if args.tls_host:
        paths = make_tls(args.out / "tls", tuple(args.tls_host), days=args.days)
        print(f"TLS CA {paths['ca']} and server certificate for {', '.join(args.tls_host)}")
    return 0
