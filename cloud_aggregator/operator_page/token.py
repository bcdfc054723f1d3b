"""`iomt cloud operator-token`: a bearer token for the operator's page and the coordinator's API.

Signed with the coordinator's key (role ``coordinator``), so it is checked exactly as the
API's tokens are: against the registry, its revocations and its expiry (services accept
lifetimes of at most 10 minutes). Paste it into the page's sign-in form within that time,
or send it as ``Authorization: Bearer ...`` to ``/operator/state.json``.
"""
from __future__ import annotations

import argparse

EXIT_OK = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-file", required=True, help="the coordinator's Ed25519 key file")
    parser.add_argument("--ttl", type=float, default=300.0,
                        help="seconds the token is valid (default 300; the services accept at most 600)")
    parser.add_argument("--audience", default="coordinator", help="the coordinator's principal name")


def run(args: argparse.Namespace) -> int:
    from protocols.auth import Signer

    print(Signer.from_file(args.key_file).token(args.audience, ttl=args.ttl))
    return EXIT_OK
