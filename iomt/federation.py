"""An in-process federation simulator for the experiments: many hospitals, one process.

Each round every hospital trains locally from the global model with the edge's own
training step (:func:`edge_server.training.train_local`: Adam, optional FedProx term,
optional DP on the update) and the server combines the results:

- ``fedavg``: sample-weighted average of the hospitals' models (source paper 000, eq. 2),
  in plaintext;
- ``fedprox``: the same with the proximal term ``mu/2 ||w - w_global||^2`` in local training;
- ``ours``: the multimodal attention model with DP on each update (clip ``C``, Gaussian
  noise ``sigma*C``, paper eq. 3) and secure aggregation: every hospital's update is
  fixed-point encoded (16 fractional bits, Z_2^64), split into additive shares with
  :mod:`protocols.sharing`, each simulated party sums only the shares it holds, and only the
  sum is reconstructed, exactly as the cloud parties do, but without the network.
  ``dp_mode="distributed"`` lets each of the K hospitals add only ``1/K`` of the noise
  variance, which the secure sum makes as private as one full draw
  (:mod:`edge_server.privacy`); ``"local"`` (default) is the paper's per-update noise;
  ``"sgd"`` is patient-level DP-SGD at every hospital (the edge's default), its noise
  calibrated so that all ``rounds`` spend ``target_epsilon`` at ``delta``; each hospital keeps
  its own ledger and the run reports the largest ε among them.

Processes and HTTP are left out on purpose (``iomt demo`` and the cloud tests cover them);
what is simulated here is the arithmetic, so the accuracy numbers are those of the real path.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from protocols import fixedpoint, params, sharing
from protocols.schema import PatientRecord

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "ours")
DP_MODES: tuple[str, ...] = ("local", "distributed")  # update-level (the paper's)
ALL_DP_MODES: tuple[str, ...] = (*DP_MODES, "sgd")


@dataclass(frozen=True)
class FederationSpec:
    """How a federated run is set up (one strategy, one seed)."""

    strategy: str = "fedavg"
    rounds: int = 10
    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    prox_mu: float = 0.01           # fedprox only
    clip_norm: float = 1.0          # ours only: L2 bound on each hospital's update
    noise_multiplier: float = 0.1   # ours only: sigma, noise std = sigma * clip_norm
    delta: float = 1e-5
    parties: int = 3                # ours only: simulated non-colluding cloud parties
    dp_mode: str = "local"          # ours only: "local" (paper eq. 3), "distributed" (1/K each) or "sgd"
    target_epsilon: float | None = 8.0  # ours with dp_mode="sgd": patient-level epsilon of the whole run
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if self.dp_mode not in ALL_DP_MODES:
            raise ValueError(f"unknown dp_mode {self.dp_mode!r}; expected one of {ALL_DP_MODES}")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError("rounds and local_epochs must be >= 1")

    @property
    def private(self) -> bool:
        return self.strategy == "ours"


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
        prox_mu=spec.prox_mu if spec.strategy == "fedprox" else 0.0,
        clip_norm=spec.clip_norm if private else None,
        noise_multiplier=spec.noise_multiplier if private else 0.0,
        noise_fraction=1.0 / hospitals if private and spec.dp_mode == "distributed" else 1.0,
        delta=spec.delta,
        dp_seed=seed if private else None,  # reproducible experiments; the edge uses OS entropy
    )


def initial_state(model_cfg, seed: int) -> dict[str, np.ndarray]:
    """A freshly initialised global model, deterministic under ``seed``."""
    import torch

    from protocols.model import build_model, state_to_numpy
    torch.manual_seed(seed)
    return state_to_numpy(build_model(model_cfg))


def plain_fedavg(states: list[Mapping[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    """Sample-weighted average of model states (paper 000, eq. 2)."""
    total = float(sum(weights))
    return {name: sum(w * np.asarray(s[name], np.float64) for s, w in zip(states, weights)) / total
            for name in states[0]}


def secure_fedavg(global_state: Mapping[str, np.ndarray], states: list[Mapping[str, np.ndarray]],
                  weights: list[int], parties: int) -> dict[str, np.ndarray]:
    """Weighted FedAvg of the updates ``state - global`` computed on additive secret shares.

    Each hospital encodes ``n_k * update_k`` in fixed point and shares it among ``parties``;
    party ``j`` adds up only its own shares (party 0 the full shares, the others the vectors
    expanded from their seeds); the sum of the party totals is ``sum_k n_k update_k``, which
    is decoded and divided by ``sum_k n_k``. No step sees a single hospital's update in the
    clear except that hospital.
    """
    spec = params.spec_of(global_state)
    base = params.flatten(global_state, spec)
    totals = [np.zeros(base.size, dtype=np.int64) for _ in range(parties)]
    for state, n in zip(states, weights):
        update = params.flatten(state, spec) - base
        full, seeds = sharing.share(fixedpoint.encode(update, scale_by=int(n)), parties)
        np.add(totals[0], full, out=totals[0])
        for j, seed in enumerate(seeds, start=1):
            np.add(totals[j], sharing.expand_seed(seed, base.size), out=totals[j])
    mean_update = fixedpoint.decode(sharing.reconstruct(totals), divisor=sum(weights))
    return params.unflatten(base + mean_update, spec)


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
    from edge_server.training.loop import evaluate, train_local

    hospitals = [h for h, recs in train.items() if recs]
    if not hospitals:
        raise ValueError("no hospital has training records")
    state = dict(init) if init is not None else initial_state(model_cfg, spec.seed)
    result = FederationResult(state=state)
    sgd = spec.private and spec.dp_mode == "sgd" and spec.target_epsilon is not None
    accountant = _accountant(spec) if spec.private and spec.dp_mode != "sgd" else None
    ledgers = {h: _accountant(spec) for h in hospitals} if sgd else {}
    for rnd in range(1, spec.rounds + 1):
        states, weights = [], []
        for i, hospital in enumerate(hospitals):
            cfg = train_config(spec, seed=spec.seed * 100_003 + rnd * 101 + i, hospitals=len(hospitals))
            local = train_local(model_cfg, state, train[hospital], cfg, progress=False, accountant=ledgers.get(hospital))
            states.append(local.state)
            weights.append(int(local.n_samples))
        if spec.private:
            state = secure_fedavg(state, states, weights, spec.parties)
        else:
            state = plain_fedavg(states, weights)
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
    from edge_server.privacy import PrivacyAccountant
    return PrivacyAccountant(delta=spec.delta)


def _step_accountant(accountant, spec: FederationSpec, weights: list[int]) -> float:
    sigma = spec.noise_multiplier
    if spec.dp_mode == "distributed":
        from edge_server.privacy import distributed_noise_multiplier
        sigma = distributed_noise_multiplier(sigma, weights)
    return float(accountant.record_round(sigma, spec.clip_norm))


def train_centralized(model_cfg, records: list[PatientRecord], spec: FederationSpec) -> dict[str, np.ndarray]:
    """The same model trained on the pooled records, for ``rounds * local_epochs`` epochs, no DP."""
    from edge_server.training.loop import train_local
    cfg = train_config(replace(spec, strategy="fedavg"), seed=spec.seed, epochs=spec.rounds * spec.local_epochs,
                       private=False)
    return train_local(model_cfg, initial_state(model_cfg, spec.seed), records, cfg, progress=False).state
