"""An in-process federation simulator for the experiments: many hospitals, one process.

Each round every hospital trains locally from the global model with the edge's own
training step (:func:`edge_server.training.train_local`: Adam, optional FedProx term,
optional DP) and the server combines the results with the cloud's own code, without the
processes and the network:

- every hospital encodes ``n_k * theta_k`` in fixed point (:mod:`protocols.fixedpoint`, as
  :class:`edge_server.federation.client.FederatedClient` does), splits it into additive shares with
  :func:`protocols.sharing.share` and :func:`protocols.aggregation_messages.sharing_to_wire`;
- each simulated party decodes its upload bodies and sums them in its own
  :class:`cloud_aggregator.accumulator.RoundAccumulator`; only the parties' totals together
  give ``S = sum_k n_k theta_k``, which is reconstructed with ``N = sum_k n_k``;
- the strategy, by the cloud's name (``fedavg``, ``fedprox``, ``fedadam``, ``fedyogi``, from
  :func:`cloud_aggregator.strategies.get_strategy`), turns ``S`` and ``N`` into the new global
  model with :meth:`~cloud_aggregator.strategies.Strategy.aggregate_plain` and sets the
  hospitals' FedProx term with :meth:`~cloud_aggregator.strategies.Strategy.round_fields`.
  FedAdam/FedYogi run the plaintext equivalent of the parties' CrypTen step here (running a
  CrypTen group in-process per round would cost far more than the training); the plaintext
  step is the reference the MPC step is tested against (tests/cloud_aggregator/test_server_opt.py).

``dp=True`` adds DP on each hospital's contribution (the paper's method, labelled "ours" by the
experiments, is FedAvg with ``dp=True`` on the multimodal attention model):
``dp_mode="local"`` (default) clips each update to ``C`` and adds Gaussian noise
``sigma*C`` (paper eq. 3); ``"distributed"`` lets each of the K hospitals add only ``1/K`` of
the noise variance, which the secure sum makes as private as one full draw
(:mod:`edge_server.training.privacy`); ``"sgd"`` is patient-level DP-SGD at every hospital (the edge's
default), its noise calibrated so that all ``rounds`` spend ``target_epsilon`` at ``delta``;
each hospital keeps its own ledger and the run reports the largest ε among them.

What is simulated is the arithmetic of the real path (fixed point, shares, the parties' sums,
the strategy), so the accuracy numbers are those of the cloud; ``iomt demo`` and the cloud
tests cover the processes and HTTP.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from cloud_aggregator.accumulator import RoundAccumulator
from cloud_aggregator.strategies import PlainState, Strategy, get_strategy
from protocols import fixedpoint, params, sharing
from protocols.aggregation_messages import ServerOptConfig, sharing_to_wire, upload_from_wire
from protocols.errors import ConfigError
from protocols.params import spec_hash
from protocols.schema import PatientRecord

log = logging.getLogger(__name__)

DP_MODES: tuple[str, ...] = ("local", "distributed")  # update-level (the paper's)
ALL_DP_MODES: tuple[str, ...] = (*DP_MODES, "sgd")


@dataclass(frozen=True)
class FederationSpec:
    """How a federated run is set up (one strategy, one seed)."""

    strategy: str = "fedavg"        # the cloud's strategy name (cloud_aggregator.strategies)
    dp: bool = False                # DP on each hospital's contribution (dp_mode)
    rounds: int = 10
    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    prox_mu: float = 0.01           # fedprox only
    clip_norm: float = 1.0          # dp only: L2 bound on each hospital's update
    noise_multiplier: float = 0.1   # dp only: sigma, noise std = sigma * clip_norm
    delta: float = 1e-5
    parties: int = 3                # simulated non-colluding cloud parties of the secure sum
    dp_mode: str = "local"          # dp only: "local" (paper eq. 3), "distributed" (1/K each) or "sgd"
    target_epsilon: float | None = 8.0  # dp with dp_mode="sgd": patient-level epsilon of the whole run
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)  # fedadam / fedyogi only
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            get_strategy(self.strategy)
        except ConfigError as err:
            raise ValueError(f"{err}") from err
        if self.dp_mode not in ALL_DP_MODES:
            raise ValueError(f"unknown dp_mode {self.dp_mode!r}; expected one of {ALL_DP_MODES}")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError("rounds and local_epochs must be >= 1")

    @property
    def private(self) -> bool:
        return self.dp

    @property
    def strategy_impl(self) -> Strategy:
        return get_strategy(self.strategy)


@dataclass
class FederationResult:
    """The final global state, per-round history and the DP guarantee reached."""

    state: dict[str, np.ndarray]
    history: list[dict] = field(default_factory=list)
    epsilon: float | None = None


def train_config(spec: FederationSpec, seed: int, epochs: int | None = None, private: bool | None = None,
                 hospitals: int = 1):
    """The edge's :class:`TrainConfig` for one local step of ``spec`` in a round of ``hospitals``."""
    from edge_server.training.loop import TrainConfig
    private = spec.private if private is None else private
    if private and spec.dp_mode == "sgd":
        if spec.target_epsilon is None:  # epsilon = inf: the same federation without DP
            private = False
        else:
            return TrainConfig(epochs=spec.local_epochs if epochs is None else epochs, batch_size=spec.batch_size,
                               lr=spec.lr, seed=seed, dp="sgd", clip_norm=spec.clip_norm,
                               target_epsilon=spec.target_epsilon, planned_rounds=spec.rounds, delta=spec.delta,
                               dp_seed=seed)
    return TrainConfig(
        epochs=spec.local_epochs if epochs is None else epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        seed=seed,
        prox_mu=spec.strategy_impl.round_fields(prox_mu=spec.prox_mu)["prox_mu"],
        clip_norm=spec.clip_norm if private else None,
        noise_multiplier=spec.noise_multiplier if private else 0.0,
        noise_fraction=1.0 / hospitals if private and spec.dp_mode == "distributed" else 1.0,
        delta=spec.delta,
        dp_seed=seed if private else None,  # reproducible experiments; the edge uses OS entropy
    )


def secure_sum(states: list[Mapping[str, np.ndarray]], weights: list[int], parties: int,
               rnd: int = 1) -> np.ndarray:
    """``S = sum_k n_k theta_k`` (float64, flat) computed the cloud's way on additive shares.

    Hospital k encodes ``n_k * theta_k`` and makes one upload body per party
    (:func:`protocols.aggregation_messages.sharing_to_wire`); party ``j`` decodes its bodies and
    adds them into its own :class:`RoundAccumulator`; the parties' totals are reconstructed
    and decoded. No step sees a single hospital's state in the clear except that hospital.
    """
    spec = params.spec_of(states[0])
    size, digest = params.spec_size(spec), spec_hash(spec)
    accs = [RoundAccumulator() for _ in range(parties)]
    names = [f"h{k}" for k in range(len(states))]
    for name, state, n in zip(names, states, weights):
        full, seeds = sharing.share(fixedpoint.encode(params.flatten(state, spec), scale_by=int(n)), parties)
        bodies = sharing_to_wire(full, seeds, hospital=name, round=rnd, n_samples=int(n), size=size,
                                 spec_hash=digest)
        for acc, body in zip(accs, bodies):
            acc.add(rnd, upload_from_wire(body))
    totals = [acc.total(rnd, size, names, _never_load) for acc in accs]
    return fixedpoint.decode(sharing.reconstruct(totals))


def _never_load(hospital: str):
    raise KeyError(f"{hospital}'s upload was not accumulated")  # every upload was added above


def aggregate(strategy: Strategy, states: list[Mapping[str, np.ndarray]], weights: list[int], parties: int,
              server: PlainState, opt: ServerOptConfig | None = None, rnd: int = 1) -> dict[str, np.ndarray]:
    """The new global model: the secure sum of ``n_k * theta_k``, then ``strategy`` on ``S`` and ``N``."""
    spec = params.spec_of(states[0])
    total = secure_sum(states, weights, parties, rnd)
    return params.unflatten(strategy.aggregate_plain(total, sum(weights), server, opt), spec)


def run_federation(model_cfg, train: Mapping[str, list[PatientRecord]], spec: FederationSpec,
                   eval_records: list[PatientRecord] | None = None, eval_every: int = 0,
                   on_round: Callable[[int, dict], None] | None = None,
                   init: Mapping[str, np.ndarray] | None = None) -> FederationResult:
    """Run ``spec.rounds`` federated rounds over the hospitals' training records.

    Parameters
    ----------
    model_cfg: the :class:`protocols.model.ModelConfig` every hospital trains.
    train: hospital -> its training records (hospitals without records are skipped).
    eval_records: held-out records the global model is scored on every ``eval_every`` rounds
        (and after the last round); the scores land in ``history``.
    """
    from edge_server.training.loop import evaluate, initial_state, train_local

    hospitals = [h for h, recs in train.items() if recs]
    if not hospitals:
        raise ValueError("no hospital has training records")
    state = dict(init) if init is not None else initial_state(model_cfg, spec.seed)
    result = FederationResult(state=state)
    sgd = spec.private and spec.dp_mode == "sgd" and spec.target_epsilon is not None
    accountant = _accountant(spec) if spec.private and spec.dp_mode != "sgd" else None
    ledgers = {h: _accountant(spec) for h in hospitals} if sgd else {}
    # as at the cloud's parties, a server optimiser warm-starts from round 1's S / N
    strategy, server = spec.strategy_impl, PlainState()
    for rnd in range(1, spec.rounds + 1):
        states, weights = [], []
        for i, hospital in enumerate(hospitals):
            cfg = train_config(spec, seed=spec.seed * 100_003 + rnd * 101 + i, hospitals=len(hospitals))
            local = train_local(model_cfg, state, train[hospital], cfg, progress=False, accountant=ledgers.get(hospital))
            states.append(local.state)
            weights.append(int(local.n_samples))
        state = aggregate(strategy, states, weights, spec.parties, server, spec.server_opt, rnd)
        state = {k: np.asarray(v, np.float32) for k, v in state.items()}
        entry: dict = {"round": rnd}
        if accountant is not None:
            entry["epsilon"] = result.epsilon = _step_accountant(accountant, spec, weights)
        elif ledgers:
            entry["epsilon"] = result.epsilon = max(led.epsilon() for led in ledgers.values())
        if eval_records and ((eval_every and rnd % eval_every == 0) or rnd == spec.rounds):
            entry.update(evaluate(model_cfg, state, eval_records))
        result.history.append(entry)
        log.info("%s round %d/%d %s", spec.strategy, rnd, spec.rounds,
                 {k: round(v, 4) for k, v in entry.items() if isinstance(v, float)})
        if on_round:
            on_round(rnd, entry)
    result.state = state
    return result


def _accountant(spec: FederationSpec):
    """One accountant (the edge's, per-patient unit, RDP via dp-accounting) gives every
    hospital's epsilon: with local DP each releases its update with the same sigma; with
    distributed DP the round's guarantee is that of the least protected hospital."""
    from edge_server.training.privacy import PrivacyAccountant
    return PrivacyAccountant(delta=spec.delta)


def _step_accountant(accountant, spec: FederationSpec, weights: list[int]) -> float:
    sigma = spec.noise_multiplier
    if spec.dp_mode == "distributed":
        from protocols.dp_noise import distributed_noise_multiplier
        sigma = distributed_noise_multiplier(sigma, weights)
    return float(accountant.record_round(sigma, spec.clip_norm))


def train_centralized(model_cfg, records: list[PatientRecord], spec: FederationSpec) -> dict[str, np.ndarray]:
    """The same model trained on the pooled records, for ``rounds * local_epochs`` epochs, no DP."""
    from edge_server.training.loop import initial_state, train_local
    cfg = train_config(replace(spec, strategy="fedavg"), seed=spec.seed, epochs=spec.rounds * spec.local_epochs,
                       private=False)
    return train_local(model_cfg, initial_state(model_cfg, spec.seed), records, cfg, progress=False).state
