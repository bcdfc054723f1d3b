"""`iomt cloud ...`: each action lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; `iomt.cli` imports it only when used."""
from __future__ import annotations

ACTIONS: dict[str, tuple[str, str]] = {
    "party": ("cloud_aggregator.party", "one non-colluding party: stores shares, aggregates, serves inference"),
    "coordinator": ("cloud_aggregator.coordinator", "registers hospitals and parties, opens and closes rounds"),
    "triples": ("cloud_aggregator.mpc.provider", "trusted third party that deals Beaver triples"),
    "credentials": ("cloud_aggregator.credentials", "make the federation's keys, registry and TLS certificates"),
    "operator-token": ("cloud_aggregator.operator_page.token", "a token for the operator's page"),
    "backup": ("cloud_aggregator.backup", "a consistent archive of a party's or the coordinator's state (online)"),
    "restore": ("cloud_aggregator.restore", "unpack a backup onto a fresh host (checks every file first)"),
}

