"""`iomt cloud triples`: the trusted third party that deals Beaver triples to the parties.

In production mode the parties use CrypTen's TTP provider: this process joins the MPC
group as the extra rank ``parties`` and runs ``crypten.mpc.provider.ttp_provider.TTPServer``,
which hands each party correlated randomness (multiplication triples, wrap counts, B2A
masks) derived from per-party seeds. It never receives a share of any input, model or
output. Each CrypTen group gets a fresh server process; when a group breaks (a party
restarts) the server is replaced and joins the next group.

Its link to the parties carries each party's triple-generator seed: before it joins, the
link is checked and its listeners bound to the MPC address only (mpc.mpclink).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import time

from cloud_aggregator.mpc.mpclink import MpcLink, MpcLinkError, add_mpc_link_arguments, resolve_link
from cloud_aggregator.mpc.worker import RESTART_BACKOFF_S, configure_distributed
from cloud_aggregator.settings import TriplesSettings
from protocols.config import add_config_argument, load_settings
from protocols.errors import ConfigError

log = logging.getLogger(__name__)
EXIT_CONFIG = 2


def serve_once(parties: int, master: str, link: MpcLink | None = None) -> None:
    """Child-process body: one TTPServer for one MPC group (returns when the group ends)."""
    import torch

    torch.set_num_threads(1)
    configure_distributed(parties, parties, master, "TTP", link)
    from crypten.mpc.provider.ttp_provider import TTPServer

    TTPServer()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser, TriplesSettings)
    parser.add_argument("--parties", type=int, help="number of computing parties n")
    parser.add_argument("--mpc-master", help="HOST:PORT of party 0's MPC rendezvous")
    add_mpc_link_arguments(parser)
    parser.add_argument("--max-groups", type=int, help="stop after serving this many groups (default 0: forever)")


def run(args: argparse.Namespace) -> int:
    try:
        s = load_settings(TriplesSettings, args.config, {
            "parties": args.parties, "mpc_master": args.mpc_master, "mpc_address": args.mpc_address,
            "mpc_interface": args.mpc_interface, "mpc_insecure": args.mpc_insecure, "max_groups": args.max_groups})
        # the provider is the last rank, after the parties
        link = resolve_link(s.mpc_master, s.parties, s.mpc_address, s.mpc_interface, s.mpc_insecure)
    except (ConfigError, MpcLinkError) as err:
        log.error("%s", err)
        return EXIT_CONFIG
    ctx = mp.get_context("spawn")
    served = 0
    try:
        while not s.max_groups or served < s.max_groups:
            proc = ctx.Process(target=serve_once, args=(s.parties, s.mpc_master, link), name="iomt-ttp")
            proc.start()
            log.info("triples provider pid %d waiting for %d parties at %s", proc.pid, s.parties, s.mpc_master)
            proc.join()
            served += 1
            log.warning("triples provider group ended (exit %s)", proc.exitcode)
            time.sleep(RESTART_BACKOFF_S)
    except KeyboardInterrupt:
        return 0
    return 0
