"""`iomt edge web`: the clinician's page, wired to the cloud's encrypted-inference client.

Lives in ``iomt`` (which composes the roles) rather than in ``edge_server``, because "Ask the
cloud" calls the same client code as `iomt infer` (:func:`iomt.infer.ask_cloud`): the edge
computes the query features, secret-shares them to the parties and reconstructs the answer.

Exit codes: 0 stopped; 2 bad settings.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from protocols.errors import ConfigError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edge_server.web.settings import WebSettings
    from protocols.config import add_config_argument

    add_config_argument(parser, WebSettings)
    parser.add_argument("--data-dir", type=Path, help="this hospital's edge data dir (its store)")
    parser.add_argument("--listen", help="HOST:PORT to serve on (hospital network only; default 127.0.0.1:8080)")
    parser.add_argument("--parties", help="comma-separated cloud party URLs, in party-index order "
                        "(empty: the page works without \"Ask the cloud\")")
    parser.add_argument("--key-file", type=Path, help="this hospital's Ed25519 key file")
    parser.add_argument("--ca", type=Path, help="the federation's CA certificate (verifies the parties)")
    parser.add_argument("--cloud-tls-cert", type=Path, help="this hospital's TLS certificate, presented to the "
                        "parties (mutual TLS; not the page's own --tls-cert)")
    parser.add_argument("--cloud-tls-key", type=Path, help="its private key")
    parser.add_argument("--cloud-tls-crl", type=Path, help="the federation CA's revocation list (crl.pem)")
    parser.add_argument("--model-version", type=int, help="global model version to ask for (default: newest)")
    parser.add_argument("--tls-cert", type=Path, help="this page's TLS certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="this page's TLS key (PEM)")
    parser.add_argument("--behind-proxy", action="store_true", default=None,
                        help="a TLS-terminating gateway (single sign-on) is in front: cookies are Secure")
    parser.add_argument("--remote-user-header", help="header carrying the user signed in by the gateway")
    parser.add_argument("--trusted-proxy", action="append", dest="trusted_proxies",
                        help="address of the gateway allowed to set --remote-user-header (repeat)")


def make_ask_cloud(parties: list[str], key_file: Path, ca: Path | None, model_version: int | None,
                   cert: Path | None = None, key: Path | None = None, crl: Path | None = None):
    """``(data_dir, patient) -> result`` for :func:`edge_server.web.create_app`."""
    from cloud_aggregator.inference.errors import InferenceError
    from edge_server.web import CloudError
    from iomt.infer import ask_cloud, client_tls
    from protocols.auth import Signer

    signer = Signer.from_file(key_file)
    verify = client_tls(ca, cert, key, crl)

    def ask(data_dir: Path, patient: str) -> dict:
        try:
            return ask_cloud(data_dir, patient, parties, signer, model_version=model_version, verify=verify)
        except InferenceError as err:
            raise CloudError(err.reason, err.detail) from err

    return ask


def build_app(settings):
    from edge_server.web import create_app

    ask = None
    if settings.parties:
        ask = make_ask_cloud(settings.parties, settings.key_file, settings.ca, settings.model_version,
                             settings.cloud_tls_cert, settings.cloud_tls_key, settings.cloud_tls_crl)
    return create_app(settings, ask)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from cloud_aggregator.serve import listen_flags
    from edge_server.web import WebSettings
    from protocols.config import load_settings

    try:
        settings = load_settings(WebSettings, args.config, {
            "data_dir": args.data_dir, **listen_flags(args.listen),
            "parties": None if args.parties is None else [u for u in args.parties.split(",") if u],
            "key_file": args.key_file, "ca": args.ca, "model_version": args.model_version,
            "cloud_tls_cert": args.cloud_tls_cert, "cloud_tls_key": args.cloud_tls_key,
            "cloud_tls_crl": args.cloud_tls_crl,
            "tls_cert": args.tls_cert, "tls_key": args.tls_key, "behind_proxy": args.behind_proxy,
            "remote_user_header": args.remote_user_header, "trusted_proxies": args.trusted_proxies})
        app = build_app(settings)
    except (ValueError, ConfigError, OSError) as err:
        log.error("bad clinician page settings: %s", err)
        print(f"error: {err}")
        return EXIT_CONFIG
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
                ssl_keyfile=str(settings.tls_key) if settings.tls_key else None)
    return EXIT_OK
