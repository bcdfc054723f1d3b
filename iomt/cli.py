"""`iomt`: one entry point, one sub-command per role.

Each role package owns a ``cli`` module with either ``register(subparsers, name, help)`` or an
``ACTIONS`` table (action -> module providing ``add_arguments(parser)`` and ``run(args)``);
sub-commands set ``func`` (called with the parsed namespace, returning an exit code). Role
and action modules are imported only when their command is used, so `iomt --help` stays fast
and a role's heavy dependencies (torch, CrypTen) load only where they are needed.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module with register(), help line)
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("device_agent.broker_cli", "run an MQTT broker (Mosquitto when installed, else embedded)"),
    "device": ("device_agent.cli", "run a device agent that publishes to a hospital broker"),
    "simulate": ("iomt.simulate", "simulate a hospital's patients and devices"),
    "edge": ("edge_server.cli", "the hospital edge server: ingest, status, train, predict"),
    "cloud": ("cloud_aggregator.cli", "cloud parties and coordinator for secure aggregation"),
    "keys": ("iomt.keys_cli", "this host's own keys: make them and a certificate request, install the certificate"),
    "ca": ("iomt.ca_cli", "the federation's CA (operator): sign, register, revoke, rotate"),
    "probe": ("iomt.probe", "health check of a party or coordinator over mutual TLS, with its own certificate"),
    "infer": ("iomt.infer", "encrypted inference for a patient (clinician's client)"),
    "demo": ("iomt.demo", "a whole federation on this machine"),
    "experiment": ("iomt.experiments", "reproduce the source papers' experiments"),
}


#: Long-running roles (command, action): they log at INFO by default, one line per round,
#: upload or connection and none per MQTT message, so that a healthy service under systemd
#: says what it does without ``-v``. Every other command stays at WARNING.
SERVICES: frozenset[tuple[str, str | None]] = frozenset({
    ("broker", None), ("device", None), ("cloud", "party"), ("cloud", "coordinator"), ("cloud", "triples"),
    ("edge", "run"), ("edge", "web"), ("edge", "federate")})
#: Libraries that log every HTTP request at INFO (the federate client polls): WARNING unless -vv.
CHATTY = ("httpx", "httpcore")


def log_level(command: str | None, action: str | None, verbose: int) -> int:
    """The root logging level: INFO for a service, WARNING otherwise, 10 lower per ``-v`` (DEBUG at most)."""
    base = logging.INFO if (command, action) in SERVICES else logging.WARNING
    return max(logging.DEBUG, base - 10 * verbose)


def _words(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-")]


def _register_actions(sub: argparse._SubParsersAction, name: str, help_line: str,
                      actions: dict[str, tuple[str, str]], argv: list[str]) -> None:
    """Add command ``name`` whose actions map to modules with ``add_arguments``/``run``;
    only the action named in ``argv`` is imported."""
    words = _words(argv)
    at = words.index(name) + 1 if name in words else len(words)
    chosen = words[at] if at < len(words) else None
    parser = sub.add_parser(name, help=help_line, description=help_line)
    subs = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, (module, text) in actions.items():
        if action != chosen:
            subs.add_parser(action, help=text, add_help=False)
            continue
        mod = importlib.import_module(module)
        p = subs.add_parser(action, help=text, description=text)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)


def _build_parser(selected: str | None, argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iomt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging: services log at INFO by default, other commands at WARNING; "
                             "each -v one level more (DEBUG at most)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_line) in COMMANDS.items():
        if name != selected:
            sub.add_parser(name, help=help_line, add_help=False)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                sub.add_parser(name, help=f"{help_line} (not available: {err})")
                continue
            raise
        actions = getattr(mod, "ACTIONS", None)
        if actions is not None:
            _register_actions(sub, name, help_line, actions, argv)
        else:
            mod.register(sub, name, help_line)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next(iter(_words(argv)), None)
    parser = _build_parser(selected if selected in COMMANDS else None, argv)
    args = parser.parse_args(argv)
    level = log_level(args.command, getattr(args, "action", None), args.verbose)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:
        for name in CHATTY:
            logging.getLogger(name).setLevel(max(level, logging.WARNING))
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(func(args) or 0)
