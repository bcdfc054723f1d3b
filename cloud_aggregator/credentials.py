"""`iomt cloud credentials`: a whole federation's keys on ONE machine (demo, tests, trials).

Writes an Ed25519 key file per principal (``keys/<id>.json``: each hospital, ``party-<i>``
and ``coordinator``) and the public ``registry.json`` every service verifies tokens against;
with ``--tls-host`` also a CA (``tls/ca/``, kept: ``iomt ca sign --dir tls/ca`` reissues) and,
per principal, its own TLS key and certificate (``tls/hosts/<id>/``: ``tls.key``, ``tls.pem``,
``ca.pem``, ``crl.pem``), so that no service can pose as another. Every private key is made
here, so this is for one-machine use; across hosts each host makes its own keys (`iomt keys
init`) and the operator signs and registers them (`iomt ca`), see deploy/README.md.
`iomt cloud credentials --revoke ID --out DIR` adds ID to the registry's revocation list;
`iomt cloud credentials --max-samples ID=N --out DIR` declares the most samples hospital ID
may claim per round (parties refuse larger claims); services re-read the registry when it
changes. Ids must be plain identifiers (protocols.auth.PRINCIPAL_ID: they name the key
files); anything else exits 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from protocols.auth import check_principal_id, declare_max_samples, make_credentials, revoke

EXIT_OK, EXIT_USAGE = 0, 2


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for keys/, registry.json and tls/")
    parser.add_argument("--hospitals", help="comma-separated hospital ids")
    parser.add_argument("--parties", type=int, default=2, help="number of cloud parties")
    parser.add_argument("--tls-host", action="append", default=[],
                        help="host name or IP the cloud services are reached at (repeat); makes tls/: a CA and "
                             "each principal's own key and certificate")
    parser.add_argument("--days", type=int, default=365, help="validity of the TLS certificates")
    parser.add_argument("--revoke", metavar="ID", help="revoke this principal in an existing registry")
    parser.add_argument("--max-samples", metavar="ID=N", action="append", default=[],
                        help="declare hospital ID's largest per-round sample count in an existing registry "
                             "(repeat; N=none removes it)")


def run(args: argparse.Namespace) -> int:
    registry = args.out / "registry.json"
    if args.revoke:
        try:
            check_principal_id(args.revoke)
        except ValueError as err:
            return _fail(f"--revoke: {err}")
        if not registry.exists():
            return _fail(f"no registry at {registry}")
        revoke(registry, args.revoke)
        print(f"revoked {args.revoke} in {registry}")
        return EXIT_OK
    if args.max_samples:
        if not registry.exists():
            return _fail(f"no registry at {registry}")
        for item in args.max_samples:
            pid, _, value = item.partition("=")
            try:
                declare_max_samples(registry, pid, None if value.lower() == "none" else int(value))
            except ValueError as err:
                return _fail(f"--max-samples {item}: {err}")
            print(f"{pid} may claim at most {value} samples per round")
        return EXIT_OK
    hospitals = [h.strip() for h in (args.hospitals or "").split(",") if h.strip()]
    if not hospitals or args.parties < 2:
        return _fail("give --hospitals a,b,... and --parties >= 2")
    try:
        for h in hospitals:
            check_principal_id(h)
    except ValueError as err:
        return _fail(f"--hospitals: {err}")
    reserved = [h for h in hospitals if h == "coordinator" or h.startswith("party-")]
    if len(set(hospitals)) != len(hospitals) or reserved:
        return _fail("--hospitals: ids must be distinct and not 'coordinator' or 'party-<i>'")
    if registry.exists():
        return _fail(f"{registry} exists; refusing to replace the federation's keys")
    make_credentials(args.out, hospitals, args.parties)
    print(f"keys for {len(hospitals)} hospitals, {args.parties} parties and the coordinator in {args.out / 'keys'}")
    if args.tls_host:
        from protocols.pki import PkiError, issue_local
        principals = [(h, "hospital") for h in hospitals] + [(f"party-{i}", "party") for i in range(args.parties)]
        try:
            issue_local(args.out / "tls", [*principals, ("coordinator", "coordinator")], tuple(args.tls_host),
                        days=args.days)
        except PkiError as err:
            return _fail(f"--tls-host: {err}")
        print(f"TLS: CA in {args.out / 'tls' / 'ca'}, each principal's key and certificate (names "
              f"{', '.join(args.tls_host)}) in {args.out / 'tls' / 'hosts'}/<id>/")
    return EXIT_OK
