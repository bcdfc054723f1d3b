"""Aggregation strategies the parties can run on additive shares.

Every strategy starts from the sum of the hospitals' uploads, which is linear, so each
party computes its share of it without talking to the other parties (the sum is kept by
:class:`cloud_aggregator.accumulator.RoundAccumulator` as uploads arrive):

* ``fedavg``: weighted FedAvg (paper 000, eq. 2). Hospital k uploads shares of
  ``n_k * theta_k``; the parties sum them into shares of ``S = sum_k n_k theta_k`` and
  publish the integer denominator ``N = sum_k n_k``; whoever reconstructs ``S`` divides by
  ``N`` in floating point.
* ``fedprox``: identical on the server; the round config carries ``prox_mu`` and each
  hospital adds the proximal term ``mu/2 ||w - w_global||^2`` to its local loss.
* ``fedadam`` / ``fedyogi`` (Reddi et al. 2021, "Adaptive Federated Optimization"): the
  parties first sum shares as for FedAvg, then run the server optimiser together in
  CrypTen on shares (:mod:`cloud_aggregator.mpc.server_opt`); the global model and the moments
  stay secret-shared.

FedAvgM is not implemented and is refused by name rather than silently replaced.
"""
from __future__ import annotations

from dataclasses import dataclass

from protocols.errors import ConfigError

NOT_IMPLEMENTED = ("fedavgm",)


@dataclass(frozen=True, slots=True)
class Strategy:
    name: str
    client_prox: bool
    #: "adam" / "yogi": a server optimiser run in MPC after the sum; None: FedAvg-style S/N
    server_opt: str | None = None



STRATEGIES = {"fedavg": Strategy("fedavg", client_prox=False),
              "fedprox": Strategy("fedprox", client_prox=True),
              "fedadam": Strategy("fedadam", client_prox=False, server_opt="adam"),
              "fedyogi": Strategy("fedyogi", client_prox=False, server_opt="yogi")}


def get_strategy(name: str) -> Strategy:
    key = name.lower()
    if key in STRATEGIES:
        return STRATEGIES[key]
    if key in NOT_IMPLEMENTED:
        raise ConfigError(f"strategy {name!r} is not implemented")
    raise ConfigError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
