"""`iomt probe URL --config FILE`: a health check that speaks the federation's mutual TLS.

The parties and the coordinator require a client certificate from the federation's CA on
every HTTPS connection, /health and /ready included, so a plain HTTP probe (the kubelet's
``httpGet``, ``curl -k``) fails the handshake. This probe presents the service's own
certificate, named in its settings file (``tls_cert``, ``tls_key``, ``tls_ca``, ``tls_crl``),
and verifies the answering server against the CA pinned to the certificate's own principal
(:func:`protocols.tls_client.pin_extensions`): the service it checks is the one it is, whatever
address it is reached at (127.0.0.1 inside its container). No token is sent; /health and
/ready need none. Container health checks and Kubernetes exec probes run it.

Exit codes: 0 the URL answered 2xx, 1 it answered otherwise or not at all (one line on
stderr says why), 2 the settings file names no usable TLS files.
"""
from __future__ import annotations

import argparse
import ssl
import sys
import tomllib
from pathlib import Path

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
#: Seconds for the whole request (the probes' own timeout is 5 s or more).
TIMEOUT_S = 4.0
#: Settings keys that name the service's TLS files (party and coordinator settings).
TLS_KEYS = ("tls_cert", "tls_key", "tls_ca")


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    parser = sub.add_parser(name, help=help_line, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", metavar="URL", help="https://127.0.0.1:PORT/health or /ready")
    parser.add_argument("--config", required=True, type=Path,
                        help="the service's settings file (its tls_cert, tls_key, tls_ca and tls_crl are used)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help=f"seconds (default {TIMEOUT_S})")
    parser.set_defaults(func=run)


def _tls_files(config: Path) -> dict[str, Path]:
    """The TLS files a settings file names (ValueError when it names none or they are unreadable)."""
    try:
        settings = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{config}: {err}") from err
    missing = [k for k in TLS_KEYS if not settings.get(k)]
    if missing:
        raise ValueError(f"{config} names no {', '.join(missing)}: the probe presents the service's own certificate")
    files = {k: Path(settings[k]) for k in (*TLS_KEYS, "tls_crl") if settings.get(k)}
    for path in files.values():
        if not path.is_file():
            raise ValueError(f"{path} (named in {config}) is not a readable file")
    return files


def run(args: argparse.Namespace) -> int:
    import httpx
    from cryptography import x509

    from protocols.pki import cert_principal
    from protocols.tls_client import client_context, pin_extensions

    if not args.url.startswith("https://"):
        print(f"probe: {args.url}: only https:// (mutual TLS) is probed", file=sys.stderr)
        return EXIT_USAGE
    try:
        files = _tls_files(args.config)
        principal = cert_principal(x509.load_pem_x509_certificate(files["tls_cert"].read_bytes()))
        if principal is None:
            raise ValueError(f"{files['tls_cert']} names no federation principal (not issued by `iomt ca sign`)")
        verify = client_context(files["tls_ca"], files["tls_cert"], files["tls_key"], files.get("tls_crl"))
    except (ValueError, OSError, ssl.SSLError) as err:
        print(f"probe: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with httpx.Client(verify=verify, timeout=args.timeout) as client:
            response = client.send(client.build_request("GET", args.url,
                                                        extensions=pin_extensions(args.url, principal)))
    except (httpx.HTTPError, ssl.SSLError, OSError) as err:
        print(f"probe: {args.url} as {principal}: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_UNHEALTHY
    if not response.is_success:
        print(f"probe: {args.url} as {principal}: HTTP {response.status_code} {response.text[:200]}", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(f"{args.url}: HTTP {response.status_code}")
    return EXIT_OK
