"""`iomt keys`: a host's own keys, made on that host (`init`), and the certificate the
federation's CA signed for it put in place (`install`).

Run ``iomt keys init`` on each host (party, coordinator, hospital edge): it writes the
principal's Ed25519 token key ``token.json`` and TLS key ``tls.key`` (mode 0600, they never
leave the host) and, for the operator, ``token.pub`` and the certificate request ``tls.csr``.
The operator signs the request (`iomt ca sign`) and registers the token key (`iomt ca
register`); ``iomt keys install`` then checks the certificate against this host's key and the
CA and installs ``tls.pem``, ``ca.pem`` and ``crl.pem``. ``iomt keys init --new-tls-key``
starts a rotation: a fresh key waits as ``tls.key.next`` until its certificate is installed.
Exit codes: 0 done, 2 refused (bad id, role, name, or a certificate that is not this host's).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE = 0, 2


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    from protocols.pki import CERT_ROLES

    parser = sub.add_parser(name, help=help_line, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = subs.add_parser("init", help="make this host's token key, TLS key and certificate request",
                        description="make this host's token key, TLS key and certificate request")
    p.add_argument("--id", required=True, help="this host's principal id (party-0, coordinator, hospital-a, ...)")
    p.add_argument("--role", required=True, choices=CERT_ROLES)
    p.add_argument("--dir", required=True, type=Path, help="this host's key folder (created 0700)")
    p.add_argument("--tls-name", action="append", default=[],
                   help="a DNS name or IP address clients reach this host at (repeat); goes into the SAN")
    p.add_argument("--new-tls-key", action="store_true",
                   help="rotation: a fresh TLS key (tls.key.next) and its request; the token key is kept")
    p.set_defaults(func=run_init)
    p = subs.add_parser("install", help="install the certificate the CA signed for this host",
                        description="check a signed certificate against this host's key and the CA, install it")
    p.add_argument("--dir", required=True, type=Path, help="this host's key folder")
    p.add_argument("--cert", required=True, type=Path, help="the certificate `iomt ca sign` wrote for this host")
    p.add_argument("--ca", type=Path, help="the federation's ca.pem (default: the one already installed)")
    p.add_argument("--crl", type=Path, help="the CA's crl.pem")
    p.set_defaults(func=run_install)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_init(args: argparse.Namespace) -> int:
    from protocols.pki import init_host

    try:
        files = init_host(args.dir, args.id, args.role, args.tls_name, new_tls_key=args.new_tls_key)
    except (ValueError, OSError) as err:
        return _fail(str(err))
    public = [p for p in (files.token_pub, files.tls_csr) if p.exists()]
    print(f"private keys of {args.id} in {files.dir} (mode 0600; they stay on this host)")
    print("give the operator: " + " ".join(str(p) for p in public))
    return EXIT_OK


def run_install(args: argparse.Namespace) -> int:
    from protocols.pki import install_cert

    try:
        files = install_cert(args.dir, args.cert.read_bytes(), args.ca.read_bytes() if args.ca else None,
                             args.crl.read_bytes() if args.crl else None)
    except (ValueError, OSError) as err:
        return _fail(str(err))
    print(f"installed {files.tls_cert} (with {files.ca.name}{', ' + files.crl.name if args.crl else ''}); "
          "restart this host's service to use it")
    return EXIT_OK
