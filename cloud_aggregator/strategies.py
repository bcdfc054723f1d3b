"""Aggregation strategies: objects the coordinator, the parties and the experiments call.

Every strategy starts from the sum of the hospitals' uploads, which is linear, so each
party computes its share of it without talking to the other parties (the sum is kept by
:class:`cloud_aggregator.accumulator.RoundAccumulator` as uploads arrive). A strategy says
what a round asks of the hospitals (:meth:`Strategy.round_fields`) and what the parties do
with that sum (:meth:`Strategy.aggregate_shares`); :meth:`Strategy.aggregate_plain` is the
same arithmetic on the reconstructed sum, used by the experiments' in-process federation
(:mod:`iomt.federation`) and by the tests as the reference.

* :class:`FedAvg` (``fedavg``): weighted FedAvg (paper 000, eq. 2). Hospital k uploads shares
  of ``n_k * theta_k``; the parties sum them into shares of ``S = sum_k n_k theta_k`` and
  publish the integer denominator ``N = sum_k n_k``; whoever reconstructs ``S`` divides by
  ``N`` in floating point.
* :class:`FedProx` (``fedprox``): identical on the server; the round config carries
  ``prox_mu`` and each hospital adds the proximal term ``mu/2 ||w - w_global||^2`` to its
  local loss.
* :class:`FedAdam` / :class:`FedYogi` (``fedadam`` / ``fedyogi``, Reddi et al. 2021,
  "Adaptive Federated Optimization"): the parties first sum shares as for FedAvg, then run
  the server optimiser together in CrypTen on shares (:mod:`cloud_aggregator.mpc.server_opt`);
  the global model and the moments stay secret-shared. Round 1 has no previous global model
  at the parties and publishes ``S / N`` (a FedAvg warm start).

FedAvgM is not implemented and is refused by name rather than silently replaced.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from protocols.aggregation_messages import RoundConfig, ServerOptConfig
from protocols.errors import ConfigError

NOT_IMPLEMENTED = ("fedavgm",)

#: The party's MPC server step: ``(opt, cfg, total, denominator) -> (theta share, meta)``.
ServerStep = Callable[[str, RoundConfig, np.ndarray, int], tuple[np.ndarray, dict]]


@dataclass
class SharedResult:
    """What a party publishes: its share of the global model, the public denominator the
    reconstruction is divided by, and what goes into the version's meta."""

    total: np.ndarray
    denominator: int
    meta: dict = field(default_factory=dict)


@dataclass
class PlainState:
    """The server's state between plaintext rounds: the global model and the optimiser's
    moments (None before the first optimiser step)."""

    theta: np.ndarray | None = None
    m: np.ndarray | None = None
    v: np.ndarray | None = None


class Strategy:
    """FedAvg's behaviour; subclasses override what differs."""

    name: ClassVar[str] = "fedavg"

    def round_fields(self, prox_mu: float = 0.0, server_opt: ServerOptConfig | None = None) -> dict:
        """The round config's fields this strategy sets (what the hospitals and parties run)."""
        return {"prox_mu": 0.0, "server_opt": None}

    def aggregate_shares(self, total: np.ndarray, denominator: int, cfg: RoundConfig,
                         server_step: ServerStep) -> SharedResult:
        """A party's share of the new global model from its share ``total`` of ``S``."""
        return SharedResult(total, denominator)

    def aggregate_plain(self, total: np.ndarray, denominator: int, state: PlainState,
                        opt: ServerOptConfig | None = None) -> np.ndarray:
        """The new global model from the reconstructed ``S`` (float) and ``N``; updates ``state``."""
        state.theta = np.asarray(total, np.float64) / float(denominator)
        return state.theta


class FedAvg(Strategy):
    name = "fedavg"


class FedProx(FedAvg):
    name = "fedprox"

    def round_fields(self, prox_mu: float = 0.0, server_opt: ServerOptConfig | None = None) -> dict:
        return {"prox_mu": prox_mu, "server_opt": None}


class FedOpt(FedAvg):
    """A server optimiser on the pseudo-gradient ``S/N - theta_prev`` (Reddi et al. 2021, Alg. 2)."""

    opt: ClassVar[str]

    def round_fields(self, prox_mu: float = 0.0, server_opt: ServerOptConfig | None = None) -> dict:
        return {"prox_mu": 0.0, "server_opt": server_opt or ServerOptConfig()}

    def aggregate_shares(self, total: np.ndarray, denominator: int, cfg: RoundConfig,
                         server_step: ServerStep) -> SharedResult:
        if cfg.base_version is None:
            return SharedResult(total, denominator,
                                {"server_opt": {"opt": self.opt, "warm_start": "S / N, no previous global model"}})
        theta, meta = server_step(self.opt, cfg, total, denominator)
        return SharedResult(theta, 1, {"server_opt": meta})  # the stored share is of theta itself

    def aggregate_plain(self, total: np.ndarray, denominator: int, state: PlainState,
                        opt: ServerOptConfig | None = None) -> np.ndarray:
        """The MPC step of :func:`cloud_aggregator.mpc.server_opt.compute` in float64 (the
        scale ``K`` cancels: ``K m / sqrt(K^2 (v + tau^2)) = m / sqrt(v + tau^2)``)."""
        o = opt or ServerOptConfig()
        avg = np.asarray(total, np.float64) / float(denominator)
        if state.theta is None:  # warm start, as the parties do
            state.theta = avg
            return avg
        delta = avg - state.theta
        m = (1 - o.beta1) * delta if state.m is None else o.beta1 * state.m + (1 - o.beta1) * delta
        state.v = self._second_moment(state.v, delta * delta, o.beta2)
        state.m = m
        state.theta = state.theta + o.lr * m / np.sqrt(state.v + o.tau ** 2)
        return state.theta

    @staticmethod
    def _second_moment(v: np.ndarray | None, d2: np.ndarray, b2: float) -> np.ndarray:
        raise NotImplementedError


class FedAdam(FedOpt):
    name = "fedadam"
    opt = "adam"

    @staticmethod
    def _second_moment(v, d2, b2):
        return (1 - b2) * d2 if v is None else b2 * v + (1 - b2) * d2


class FedYogi(FedOpt):
    name = "fedyogi"
    opt = "yogi"

    @staticmethod
    def _second_moment(v, d2, b2):
        if v is None:  # v = 0 before the first step: Adam and Yogi agree
            return (1 - b2) * d2
        return v - (1 - b2) * d2 * np.where(v - d2 >= 0, 1.0, -1.0)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (FedAvg(), FedProx(), FedAdam(), FedYogi())}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (case-insensitive); :class:`ConfigError` for any other name."""
    key = name.lower()
    if key in STRATEGIES:
        return STRATEGIES[key]
    if key in NOT_IMPLEMENTED:
        raise ConfigError(f"strategy {name!r} is not implemented")
    raise ConfigError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
