"""Aggregation strategies the parties can run on additive shares.

Every strategy here is linear in the hospitals' uploads, so each party applies it to its
own shares without talking to the other parties (the sum itself is kept by
:class:`cloud_aggregator.accumulator.RoundAccumulator` as uploads arrive):

* ``fedavg``: weighted FedAvg (paper 000, eq. 2). Hospital k uploads shares of
  ``n_k * theta_k``; the parties sum them into shares of ``S = sum_k n_k theta_k`` and
  publish the integer denominator ``N = sum_k n_k``; whoever reconstructs ``S`` divides by
  ``N`` in floating point.
* ``fedprox``: identical on the server; the round config carries ``prox_mu`` and each
  hospital adds the proximal term ``mu/2 ||w - w_global||^2`` to its local loss.

Server optimisers with non-linear state (FedAdam, FedYogi: squares, square roots,
division by a secret) would need an MPC protocol across the parties and are not
implemented; they are refused by name rather than silently replaced.
"""
from __future__ import annotations

from dataclasses import dataclass

from protocols.errors import ConfigError

NOT_IMPLEMENTED = ("fedadam", "fedyogi", "fedavgm")


@dataclass(frozen=True, slots=True)
class Strategy:
    name: str
    client_prox: bool



STRATEGIES = {"fedavg": Strategy("fedavg", client_prox=False),
              "fedprox": Strategy("fedprox", client_prox=True)}


def get_strategy(name: str) -> Strategy:
    key = name.lower()
    if key in STRATEGIES:
        return STRATEGIES[key]
    if key in NOT_IMPLEMENTED:
        raise ConfigError(f"strategy {name!r} needs non-linear MPC on the server and is not implemented")
    raise ConfigError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
