"""`iomt ca`: the operator's federation CA: `init` once, `sign` one certificate per service from
the request its host made (`iomt keys init`), `register` each principal's public token key in
``registry.json``, `revoke` a certificate (and, with ``--registry``, the principal's tokens),
and `crl` to re-sign the revocation list before it lapses.

The CA folder holds ``ca.key`` (mode 0600; keep it offline), ``ca.pem`` and ``crl.pem``
(copy both to every host), ``issued.json`` (every certificate issued) and ``certs/<id>.pem``.
Signing a new request for an id that already has a certificate supersedes the old one: it
is revoked in ``crl.pem`` (``--keep-previous`` keeps it valid for an overlap).
Exit codes: 0 done, 2 refused (no CA, bad request, id mismatch, unknown id).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE = 0, 2


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    from protocols.pki import CERT_ROLES, DEFAULT_DAYS, ROLES

    parser = sub.add_parser(name, help=help_line, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, text: str, func) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        return p

    p = action("init", "create the federation's CA (once; reused for every certificate)", run_init)
    p.add_argument("--dir", required=True, type=Path, help="the CA folder (created 0700)")
    p.add_argument("--name", default="iomt federation CA", help="the CA's common name")
    p.add_argument("--days", type=int, default=3650, help="validity of the CA certificate (default 3650)")
    p = action("sign", "sign a host's certificate request: one certificate per service", run_sign)
    p.add_argument("--dir", required=True, type=Path, help="the CA folder")
    p.add_argument("--csr", required=True, type=Path, help="the host's tls.csr")
    p.add_argument("--id", required=True, help="the principal the request must name")
    p.add_argument("--role", required=True, choices=CERT_ROLES)
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
    p.add_argument("--tls-name", action="append", default=None,
                   help="DNS name or IP address for the SAN (repeat); default: the request's")
    p.add_argument("--keep-previous", action="store_true",
                   help="leave the id's earlier certificates valid (default: revoked as superseded)")
    p.add_argument("--share-names", action="store_true",
                   help="allow names another principal's valid certificate holds (services on one host)")
    p.add_argument("--out", type=Path, help="certificate file (default: <dir>/certs/<id>.pem)")
    p = action("register", "add a principal's public token key (token.pub) to registry.json", run_register)
    p.add_argument("--registry", required=True, type=Path, help="registry.json (created if absent)")
    p.add_argument("--id", required=True)
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--public-key", required=True, type=Path, help="the host's token.pub")
    p = action("revoke", "revoke a principal's certificates (or one serial); rewrites crl.pem", run_revoke)
    p.add_argument("--dir", required=True, type=Path, help="the CA folder")
    p.add_argument("--id", required=True)
    p.add_argument("--serial", help="only this certificate (hex serial, see `iomt ca list`)")
    p.add_argument("--registry", type=Path, help="also revoke the principal's tokens in this registry.json")
    p = action("crl", "re-sign crl.pem (before its next-update date passes)", run_crl)
    p.add_argument("--dir", required=True, type=Path, help="the CA folder")
    p.add_argument("--days", type=int, default=365, help="validity of the CRL (default 365)")
    p = action("list", "the certificates this CA issued", run_list)
    p.add_argument("--dir", required=True, type=Path, help="the CA folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_init(args: argparse.Namespace) -> int:
    from protocols.pki import CertificateAuthority

    try:
        ca = CertificateAuthority.init(args.dir, args.name, args.days)
    except (ValueError, OSError) as err:
        return _fail(str(err))
    print(f"CA in {ca.dir}: keep ca.key (mode 0600) offline; give every host {ca.cert_path} and {ca.crl_path}")
    return EXIT_OK


def run_sign(args: argparse.Namespace) -> int:
    from protocols.pki import CertificateAuthority, cert_names

    try:
        ca = CertificateAuthority(args.dir)
        pem, superseded = ca.sign(args.csr.read_bytes(), args.id, args.role, days=args.days, names=args.tls_name,
                                  keep_previous=args.keep_previous, share_names=args.share_names)
    except (ValueError, OSError) as err:
        return _fail(str(err))
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    out = args.out or args.dir / "certs" / f"{args.id}.pem"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pem)
    print(f"signed {out}: {args.id} ({args.role}), serial {cert.serial_number:x}, names "
          f"{', '.join(cert_names(cert)) or '(none)'}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    if superseded:
        print(f"superseded and revoked: {', '.join(superseded)}; copy {ca.crl_path} to every host")
    return EXIT_OK


def run_register(args: argparse.Namespace) -> int:
    from protocols.pki import register

    try:
        new = register(args.registry, args.id, args.role, args.public_key.read_bytes())
    except (ValueError, OSError) as err:
        return _fail(str(err))
    print(f"{'registered' if new else 'replaced the token key of'} {args.id} ({args.role}) in {args.registry}; "
          "copy it to every cloud host (services re-read it)")
    return EXIT_OK


def run_revoke(args: argparse.Namespace) -> int:
    from protocols.auth import check_principal_id, revoke
    from protocols.pki import CertificateAuthority

    try:
        check_principal_id(args.id)
        ca = CertificateAuthority(args.dir)
        done = ca.revoke(args.id, args.serial)
        if args.registry:
            revoke(args.registry, args.id)
    except (ValueError, OSError) as err:
        return _fail(str(err))
    print(f"revoked {', '.join(done) or 'nothing new'} of {args.id}; copy {ca.crl_path} to every host"
          + (f"; {args.id}'s tokens are revoked in {args.registry}" if args.registry else ""))
    return EXIT_OK


def run_crl(args: argparse.Namespace) -> int:
    from protocols.pki import CertificateAuthority

    try:
        path = CertificateAuthority(args.dir).write_crl(args.days)
    except (ValueError, OSError) as err:
        return _fail(str(err))
    print(f"re-signed {path}; copy it to every host")
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    from protocols.pki import CertificateAuthority

    try:
        index = CertificateAuthority(args.dir).index()
    except (ValueError, OSError) as err:
        return _fail(str(err))
    if args.json:
        print(json.dumps(index))
        return EXIT_OK
    for serial, e in index.items():
        state = f"revoked ({e['revoked']['reason']})" if e["revoked"] else "valid"
        print(f"{serial}  {e['id']:<16} {e['role']:<12} {state:<24} until {e['not_after'][:10]}  {' '.join(e['names'])}")
    return EXIT_OK
