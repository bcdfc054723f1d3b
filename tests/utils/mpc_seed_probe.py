"""Test-only launcher: ``python tests/utils/mpc_seed_probe.py <iomt args>`` runs `iomt` exactly
as ``python -m iomt`` does, and each CrypTen process it spawns appends the secret seeds it
received over the MPC link to ``$IOMT_TEST_SEED_FILE`` (JSON lines).

This is the ground truth a packet-capture test searches the link for. It lives in tests/ so
that the product has no switch that reveals seeds: the patch is installed here, at import, in
this process and in every spawned child (multiprocessing's spawn re-imports the parent's main
script, this file, as ``__mp_main__``).
"""
from __future__ import annotations

import json
import os
import struct

import cloud_aggregator.crypten_compat as compat

_original_load = compat.load_crypten


def _u64(seed: int) -> str:
    """A seed as the 8 bytes torch.distributed sends (int64, little endian), in hex."""
    return struct.pack("<Q", seed % 2**64).hex()


def _record(crypten) -> None:
    import torch
    from crypten.mpc.provider.ttp_provider import TTPClient

    seeds = {}
    if "next" in crypten.generators:  # the pairwise zero-sharing seeds, one sent to the next party
        cpu = torch.device("cpu")
        seeds["przs_next"] = _u64(crypten.generators["next"][cpu].initial_seed())
        seeds["przs_prev"] = _u64(crypten.generators["prev"][cpu].initial_seed())
    client = getattr(TTPClient, "_TTPClient__instance", None)
    if client is not None:  # a party of a TTP group: the seed the triples provider sent it
        seeds["ttp"] = _u64(client.generator.initial_seed())
    with open(os.environ["IOMT_TEST_SEED_FILE"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"pid": os.getpid(), **seeds}) + "\n")


def _load_and_probe():
    crypten = _original_load()
    if not getattr(crypten.init, "_probed", False):
        original_init = crypten.init

        def init(*args, **kwargs):
            out = original_init(*args, **kwargs)
            _record(crypten)
            return out

        init._probed = True
        crypten.init = init
    return crypten


if os.environ.get("IOMT_TEST_SEED_FILE"):
    compat.load_crypten = _load_and_probe

if __name__ == "__main__":
    import sys

    from iomt.cli import main

    sys.argv[0] = "iomt"
    raise SystemExit(main())
