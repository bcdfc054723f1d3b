"""Differential privacy at the edge: the per-hospital privacy ledger, and update-level DP.

Two mechanisms, one accountant. **DP-SGD** (the default of the real path,
:mod:`edge_server.training.dpsgd`): every local step clips each patient's gradient to ``C``
and adds ``N(0, (σC)²)`` to the sum over a Poisson sample of the hospital's patients; a step
is a Poisson-subsampled Gaussian mechanism with sampling rate ``q`` (Abadi et al., 2016),
neighbouring stores differ by adding or removing one patient, and the ledger composes every
step of every round. **Update-level DP** (the source paper's, kept to reproduce its Table II,
``--dp update``): described below; each round is one Gaussian mechanism.

Update-level DP. The update ``Δ = w_local - w_global`` is clipped to L2 norm ``C`` and Gaussian noise
``N(0, (σC)²)`` is added to every coordinate (source paper, eq. 3; the Gaussian mechanism
of Dwork & Roth, 2014). Each round is one Gaussian mechanism; rounds compose, and the RDP
accountant of Google's ``dp-accounting`` library turns the composition into ε at δ.

Privacy unit. ``unit="patient"`` (default): neighbouring stores differ in one patient; both
clipped updates have norm ≤ C, so they differ by at most 2C and the effective noise
multiplier is σ/2. ``unit="hospital"``: neighbouring federations differ in one hospital's
whole update, whose contribution to the aggregate has sensitivity C (DP-FedAvg, McMahan
et al., 2018), so the noise multiplier is σ.

Local or distributed noise. By default (``noise_fraction=1``) each hospital adds the whole
``N(0, (σC)²)`` to its own update (the source paper's eq. 3): the guarantee holds even
against a cloud that reconstructs that single update. Under secure aggregation nobody sees a
single update, only the sum over the K hospitals of a round, so each may add a fraction
``1/K`` of the variance and the sum still carries ``N(0, (σC)²)`` (distributed DP, Kairouz
et al., 2021). In `iomt edge federate` this is :func:`add_distributed_noise`, applied on top of
patient-level DP-SGD when the coordinator announces it (K, σ, C and the minimum number of
participants in the round config); what it adds and assumes is in the README's privacy
section. :func:`protocols.dp_noise.distributed_noise_multiplier` gives the guarantee of a
weighted aggregate.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from protocols.errors import IomtError

log = logging.getLogger(__name__)

ACCOUNTANT_FILE = "privacy_accountant.json"
#: Rényi orders of the accountant. dp-accounting's default fractional orders below 2 fail to
#: converge (and are dropped, with a warning each) at the large sampling rates of small
#: hospitals; integer orders are exact for the subsampled Gaussian (Mironov et al., 2019).
RDP_ORDERS = tuple(range(2, 64)) + (80, 96, 128, 192, 256, 512, 1024)
Unit = Literal["patient", "hospital"]
Mechanism = Literal["update", "dpsgd"]
_SENSITIVITY = {"patient": 2.0, "hospital": 1.0}


class PrivacyBudgetExceeded(IomtError):
    """Another round would take ε past the configured budget; the round was not started."""


@dataclass(frozen=True, slots=True)
class DpResult:
    """What :func:`privatize_update` did: the update norm before clipping, the scale it was
    multiplied by (1.0 when it was already within ``C``), and the noise standard deviation."""

    norm_before: float
    clip_scale: float
    noise_std: float


def flatten(update: dict[str, torch.Tensor]) -> torch.Tensor:
    """All tensors of ``update`` (in its key order) as one float32 vector."""
    return torch.cat([t.reshape(-1).to(torch.float32) for t in update.values()])


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten` for tensors shaped like ``like``."""
    out, pos = {}, 0
    for name, ref in like.items():
        out[name] = vector[pos:pos + ref.numel()].reshape(ref.shape)
        pos += ref.numel()
    return out


def privatize_update(update: dict[str, torch.Tensor], clip_norm: float, noise_multiplier: float,
                     generator: torch.Generator | None = None,
                     noise_fraction: float = 1.0) -> tuple[dict[str, torch.Tensor], DpResult]:
    """Clip ``update`` as a whole to L2 norm ``clip_norm`` and add ``N(0, f·(σ·C)²)`` noise.

    Parameters
    ----------
    noise_fraction:
        ``f``, the share of the noise variance this hospital adds: 1 for local DP, ``1/K``
        for distributed DP across the K hospitals of a securely aggregated round (module
        docstring).
    generator:
        Source of the noise. ``None`` draws a seed from the operating system, which is
        what production needs; tests pass a seeded generator for reproducibility.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be non-negative, got {noise_multiplier}")
    if not 0 < noise_fraction <= 1:
        raise ValueError(f"noise_fraction must be in (0, 1], got {noise_fraction}")
    vec = flatten(update)
    norm = float(torch.linalg.vector_norm(vec))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    vec = vec * scale
    std = noise_multiplier * clip_norm * math.sqrt(noise_fraction)
    if std > 0:
        if generator is None:
            generator = torch.Generator(device=vec.device)
            generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
        vec = vec + std * torch.randn(vec.shape, generator=generator, device=vec.device, dtype=vec.dtype)
    return unflatten(vec, update), DpResult(norm_before=norm, clip_scale=scale, noise_std=std)


def add_distributed_noise(state: dict[str, np.ndarray], base: dict[str, np.ndarray], clip_norm: float,
                          noise_multiplier: float, hospitals: int,
                          generator: torch.Generator | None = None) -> tuple[dict[str, np.ndarray], DpResult]:
    """This hospital's share of a round's distributed noise: ``base + clip(state - base, C) +
    N(0, σ²C²/K)`` (K = ``hospitals``), so that K such updates sum to the full ``N(0, σ²C²)``.

    Applied on top of whatever local training did (patient-level DP-SGD by default), as the
    coordinator's round config announces it (:class:`protocols.aggregation_messages.DistributedNoise`).
    """
    update = {k: torch.from_numpy(np.asarray(state[k], np.float32) - np.asarray(base[k], np.float32))
              for k in state}
    noised, result = privatize_update(update, clip_norm, noise_multiplier, generator, noise_fraction=1.0 / hospitals)
    return {k: (np.asarray(base[k], np.float32) + noised[k].numpy()).astype(np.float32) for k in state}, result


def dpsgd_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (RDP, dp-accounting)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
    acc.compose(_step_event(noise_multiplier, sample_rate), steps)
    return float(acc.get_epsilon(delta))


def _step_event(sigma: float, sample_rate: float) -> dp_event.DpEvent:
    gauss = dp_event.GaussianDpEvent(sigma)
    return gauss if sample_rate >= 1.0 else dp_event.PoissonSampledDpEvent(sample_rate, gauss)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    tolerance: float = 0.005) -> float:
    """The smallest noise multiplier σ (to within ``tolerance`` relative) whose ``steps``
    DP-SGD steps at ``sample_rate`` spend at most ``target_epsilon`` at ``delta``.

    Uses the same accountant as the ledger, so a run planned at ``target_epsilon`` never
    trips a budget of the same value on its last round.
    """
    if not 0 < target_epsilon < math.inf:
        raise ValueError(f"target epsilon must be positive and finite, got {target_epsilon}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    lo, hi = 0.0, 1.0
    while dpsgd_epsilon(hi, sample_rate, steps, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"epsilon {target_epsilon} at delta {delta} is out of reach")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if dpsgd_epsilon(mid, sample_rate, steps, delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


class PrivacyAccountant:
    """ε at δ over everything this edge has released, persisted under its data directory.

    Every entry of the ledger is one released round: DP-SGD rounds hold their noise
    multiplier, Poisson sampling rate and number of steps; update-level rounds one Gaussian
    mechanism. ε is the RDP composition of all of them (dp-accounting), so it keeps growing
    across rounds, restarts and re-runs on the same data directory.

    Parameters
    ----------
    delta: target δ.
    epsilon_budget: ε that no round may exceed (``None``: no budget).
    path: JSON file holding the rounds so far (``None``: in memory only).
    unit: privacy unit, ``"patient"`` or ``"hospital"`` (see the module docstring).
    """

    def __init__(self, delta: float = 1e-5, epsilon_budget: float | None = None,
                 path: str | Path | None = None, unit: Unit = "patient") -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if unit not in _SENSITIVITY:
            raise ValueError(f"unit must be one of {sorted(_SENSITIVITY)}, got {unit!r}")
        self.delta = delta
        self.epsilon_budget = epsilon_budget
        self.path = Path(path) if path is not None else None
        self.unit: Unit = unit
        self.rounds: list[dict] = []
        if self.path is not None and self.path.exists():
            self._load()

    @classmethod
    def for_data_dir(cls, data_dir: str | Path, **kwargs) -> PrivacyAccountant:
        """The accountant persisted as ``<data_dir>/privacy_accountant.json``."""
        return cls(path=Path(data_dir) / ACCOUNTANT_FILE, **kwargs)

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            rounds = [dict(noise_multiplier=float(r["noise_multiplier"]), unit=str(r["unit"]),
                           clip_norm=r.get("clip_norm"), mechanism=str(r.get("mechanism", "update")),
                           sample_rate=float(r.get("sample_rate", 1.0)), steps=int(r.get("steps", 1)))
                      for r in data["rounds"]]
            if any(r["unit"] not in _SENSITIVITY or r["mechanism"] not in ("update", "dpsgd") for r in rounds):
                raise ValueError("unknown unit or mechanism")
        except (OSError, ValueError, KeyError, TypeError) as err:
            # A corrupt ledger must not silently restart the privacy budget at zero.
            raise IomtError(f"privacy accountant state {self.path} is unreadable: {err}") from err
        self.rounds = rounds

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"delta": self.delta, "unit": self.unit, "rounds": self.rounds,
                   "epsilon": self.epsilon(), "epsilon_budget": self.epsilon_budget}  # budget: for metrics
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".accountant-")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1)
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a ledger

    def _events(self, extra: dict | None = None) -> list[tuple[float, float, int]]:
        """``(effective σ, sampling rate, steps)`` of every round, plus ``extra``."""
        out = []
        for r in self.rounds + ([extra] if extra else []):
            # DP-SGD: add/remove one patient moves the clipped sum by at most C (sensitivity 1);
            # update-level: see the module docstring
            sens = 1.0 if r["mechanism"] == "dpsgd" else _SENSITIVITY[r["unit"]]
            out.append((r["noise_multiplier"] / sens, r["sample_rate"], r["steps"]))
        return out

    def _epsilon_of(self, events: list[tuple[float, float, int]], delta: float) -> float:
        if not events:
            return 0.0
        if min(sigma for sigma, _, _ in events) <= 0:
            return math.inf
        acc = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
        for sigma, q, steps in events:
            acc.compose(_step_event(sigma, q), steps)
        return float(acc.get_epsilon(delta))

    def _entry(self, noise_multiplier: float, clip_norm: float | None, sample_rate: float, steps: int,
               mechanism: Mechanism) -> dict:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if mechanism not in ("update", "dpsgd") or (mechanism == "update" and (sample_rate, steps) != (1.0, 1)):
            raise ValueError(f"an update-level round is one unsampled Gaussian mechanism, got {mechanism!r} "
                             f"with sample_rate={sample_rate}, steps={steps}")
        return {"noise_multiplier": float(noise_multiplier), "unit": self.unit, "clip_norm": clip_norm,
                "mechanism": mechanism, "sample_rate": float(sample_rate), "steps": int(steps)}

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the accountant's δ)."""
        return self._epsilon_of(self._events(), self.delta if delta is None else delta)

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1,
                          mechanism: Mechanism = "update") -> float:
        """ε after one more round: one Gaussian mechanism with ``noise_multiplier`` (update
        level), or ``steps`` DP-SGD steps at ``sample_rate`` (``mechanism="dpsgd"``)."""
        extra = self._entry(noise_multiplier, None, sample_rate, steps, mechanism)
        return self._epsilon_of(self._events(extra), self.delta)

    def check_budget(self, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1,
                     mechanism: Mechanism = "update") -> float:
        """Raise :class:`PrivacyBudgetExceeded` if one more round would exceed the budget.

        Returns the projected ε after that round.
        """
        projected = self.projected_epsilon(noise_multiplier, sample_rate, steps, mechanism)
        if self.epsilon_budget is not None and projected > self.epsilon_budget:
            raise PrivacyBudgetExceeded(
                f"refusing to start round {len(self.rounds) + 1}: it would bring epsilon to "
                f"{projected:.3g} at delta={self.delta:g} ({self.unit} level), over the budget of "
                f"{self.epsilon_budget:g} (spent so far: {self.epsilon():.3g} in {len(self.rounds)} rounds, "
                f"ledger {self.path or 'in memory'}). Privacy loss only adds up: raise the budget "
                f"deliberately, or train on other data")
        return projected

    def record_round(self, noise_multiplier: float, clip_norm: float | None = None,
                     sample_rate: float = 1.0, steps: int = 1, mechanism: Mechanism = "update") -> float:
        """Account one released round; persist; return ε so far."""
        self.rounds.append(self._entry(noise_multiplier, clip_norm, sample_rate, steps, mechanism))
        eps = self.epsilon()
        self._save()
        log.info("privacy: round %d released, epsilon=%.4g at delta=%g (%s level)", len(self.rounds), eps,
                 self.delta, self.unit)
        return eps

    def summary(self) -> dict:
        """JSON-ready state: rounds, ε, δ, budget, unit."""
        eps = self.epsilon()
        return {"rounds": len(self.rounds), "epsilon": None if math.isinf(eps) else eps,
                "delta": self.delta, "epsilon_budget": self.epsilon_budget, "unit": self.unit,
                "steps": sum(r["steps"] for r in self.rounds),
                "mechanisms": sorted({r["mechanism"] for r in self.rounds})}


def read_ledger(data_dir: str | Path) -> dict | None:
    """The summary of ``<data_dir>/privacy_accountant.json`` (``None`` when there is none),
    for status displays; never creates or changes the ledger."""
    path = Path(data_dir) / ACCOUNTANT_FILE
    if not path.exists():
        return None
    try:
        delta = float(json.loads(path.read_text()).get("delta", 1e-5))
    except (OSError, ValueError, AttributeError) as err:
        raise IomtError(f"privacy accountant state {path} is unreadable: {err}") from err
    return PrivacyAccountant(delta=delta, path=path).summary()

