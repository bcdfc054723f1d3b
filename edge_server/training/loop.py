"""Local training of the multimodal model (Adam, FedProx option; patient-level DP-SGD or the paper's
DP on the update) and evaluation."""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from edge_server.training.privacy import PrivacyAccountant, privatize_update
from edge_server.training.data import RecordTensors, records_to_tensors
from edge_server.training.metrics import classification_metrics
from protocols.errors import IomtError
from protocols.model import ModelConfig, build_model, load_numpy_state, state_to_numpy
from protocols.schema import PatientRecord

log = logging.getLogger(__name__)


class TrainingError(IomtError):
    """Local training cannot run (e.g. no usable labelled record)."""


class TrainConfig(BaseModel):
    """Local training options (defaults: the source paper's Adam, lr 1e-3, batch 32, 10 epochs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    device: str = Field("auto", description='"auto" (CUDA when available), "cpu", "cuda", "cuda:1" ...')
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal coefficient (0: plain FedAvg local step)")
    dp: Literal["off", "sgd", "update"] = Field("off", description=(
        '"sgd": patient-level DP-SGD (edge_server.training.dpsgd); "update": the source paper\'s clip and '
        'noise of the whole update; "off". When not given: "update" if clip_norm is set, else "off"'))
    clip_norm: float | None = Field(None, gt=0, description=(
        "L2 bound C: on each patient's gradient (sgd, default 1.0) or on the whole update (update)"))
    noise_multiplier: float = Field(0.0, ge=0, description=(
        "sigma; noise std is sigma*C (sgd: 0 means calibrate from target_epsilon)"))
    target_epsilon: float | None = Field(None, gt=0, description=(
        "sgd: calibrate sigma so that planned_rounds rounds spend this epsilon at delta"))
    planned_rounds: int = Field(1, ge=1, description="sgd: rounds the calibration covers (the whole federation)")
    noise_fraction: float = Field(1.0, gt=0, le=1, description=(
        "share of the noise variance this hospital adds: 1 = local DP (paper eq. 3); 1/K = distributed DP "
        "across the K hospitals of a securely aggregated round (edge_server.training.privacy)"))
    delta: float = Field(1e-5, gt=0, lt=1)
    epsilon_budget: float | None = Field(None, gt=0)
    dp_seed: int | None = Field(None, description="seed of the DP noise; None: OS entropy (production)")

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data):
        if isinstance(data, dict) and "dp" not in data:
            data = {**data, "dp": "update" if data.get("clip_norm") is not None else "off"}
        return data

    @model_validator(mode="after")
    def _check_dp(self):
        if self.dp == "update" and self.clip_norm is None:
            raise ValueError("dp='update' needs clip_norm")
        if self.dp == "sgd" and self.noise_multiplier == 0 and self.target_epsilon is None:
            raise ValueError("dp='sgd' needs target_epsilon or a positive noise_multiplier")
        return self

    @property
    def dp_enabled(self) -> bool:
        return self.dp != "off"

    @property
    def own_noise_multiplier(self) -> float:
        """The noise multiplier of what this hospital adds by itself, ``σ·√noise_fraction``:
        what its own accountant can vouch for without trusting the other hospitals or the
        secure aggregation (equal to σ for local DP)."""
        return self.noise_multiplier * math.sqrt(self.noise_fraction)


@dataclass(frozen=True)
class LocalResult:
    """A finished local round: the state to send (float32, DP applied), its sample count, metrics."""

    state: dict[str, np.ndarray]
    n_samples: int
    metrics: dict = field(default_factory=dict)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def fit(model: nn.Module, data: RecordTensors, cfg: TrainConfig, device: torch.device,
        global_params: dict[str, torch.Tensor] | None = None, progress: bool = True) -> dict:
    """Run ``cfg.epochs`` epochs of Adam on ``data`` (already on ``device``), in place.

    Each epoch visits every patient once in a seeded random order, with one of the
    patient's signal windows drawn at random. Returns loss and throughput figures.
    """
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(data)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    prox = [(p, global_params[name]) for name, p in model.named_parameters()] \
        if cfg.prox_mu > 0 and global_params is not None else []
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="local training", unit="batch",
               disable=not progress, leave=False)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        window = (torch.rand(n, generator=gen) * data.n_windows.cpu()).long()
        order, window = order.to(device), window.to(device)
        epoch_loss = torch.zeros((), device=device)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            logits, _ = model(*data.inputs(idx, window[idx]))
            loss = loss_fn(logits, data.labels[idx])
            if prox:
                # FedProx (Li et al., 2020): mu/2 * ||w - w_global||^2 keeps the local model near the global one.
                loss = loss + 0.5 * cfg.prox_mu * sum(((p - g) ** 2).sum() for p, g in prox)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.detach() * len(idx)
            bar.update(1)
        losses.append(float(epoch_loss) / n)  # one device sync per epoch
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    return {"loss": losses[-1], "loss_history": losses, "steps": cfg.epochs * steps_per_epoch,
            "seconds": seconds, "samples_per_s": cfg.epochs * n / seconds if seconds > 0 else None}


def train_local(model_cfg: ModelConfig, global_state: dict[str, np.ndarray] | None,
                train_records: list[PatientRecord], cfg: TrainConfig, progress: bool = True,
                accountant: PrivacyAccountant | None = None) -> LocalResult:
    """One local round: start from ``global_state`` and train, privately when ``cfg.dp`` says so.

    Parameters
    ----------
    global_state:
        The global model (``state_to_numpy`` format); ``None`` starts from the seeded
        initialisation, which is then the reference of the update.
    accountant:
        When given (and DP is on), the round is refused up front with
        :class:`~edge_server.training.privacy.PrivacyBudgetExceeded` if it would exceed
        ``accountant.epsilon_budget``, before any training, and is recorded once released.

    Returns
    -------
    LocalResult whose ``state`` was trained with patient-level DP-SGD (``dp="sgd"``), is
    ``global + clip(Δ, C) + N(0, (σC)²)`` (``dp="update"``), or the plainly trained state.
    ``metrics`` carries ``epsilon`` (ledger total), ``delta`` and ``privacy_unit`` when an
    accountant is given.
    """
    if accountant is not None and not cfg.dp_enabled and accountant.epsilon_budget is not None:
        raise TrainingError("an epsilon budget is set but DP is off: choose dp='sgd' or dp='update'")
    data = records_to_tensors(train_records, model_cfg, need_label=True)
    if len(data) == 0:
        raise TrainingError(f"no usable labelled record among {len(train_records)} (skipped: {dict(data.skipped)})")
    plan = None
    if cfg.dp == "sgd":
        from edge_server.training.dpsgd import plan as dpsgd_plan
        plan = dpsgd_plan(len(data), cfg.batch_size, cfg.epochs, cfg.clip_norm or 1.0, delta=cfg.delta,
                          noise_multiplier=cfg.noise_multiplier or None, target_epsilon=cfg.target_epsilon,
                          planned_rounds=cfg.planned_rounds)
        if accountant is not None:
            if accountant.unit != "patient":
                raise TrainingError(f"DP-SGD protects patients; the accountant's unit is {accountant.unit!r}")
            accountant.check_budget(plan.noise_multiplier, plan.sample_rate, plan.steps, "dpsgd")
    elif cfg.dp == "update" and accountant is not None:
        accountant.check_budget(cfg.own_noise_multiplier)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(model_cfg)
    if global_state is not None:
        load_numpy_state(model, global_state)
    model.to(device)
    reference = _float_state(model)
    param_names = {name for name, _ in model.named_parameters()}
    params_ref = {k: v for k, v in reference.items() if k in param_names}
    if plan is not None:
        from edge_server.training.dpsgd import fit_dpsgd
        bar = tqdm(total=plan.steps, desc="local DP-SGD", unit="step", disable=not progress, leave=False)
        stats = fit_dpsgd(model, data.to(device), plan, lr=cfg.lr, weight_decay=cfg.weight_decay, device=device,
                          prox_mu=cfg.prox_mu, global_params=params_ref, dp_seed=cfg.dp_seed, progress_bar=bar)
        bar.close()
    else:
        stats = fit(model, data.to(device), cfg, device, params_ref, progress)
    trained = _float_state(model)
    update = {k: trained[k] - reference[k] for k in reference}
    metrics = {**stats, "n_skipped": dict(data.skipped), "device": str(device), "dp": cfg.dp}
    metrics["update_norm"] = float(torch.linalg.vector_norm(torch.cat([u.reshape(-1) for u in update.values()])))
    if plan is not None:
        metrics.update(noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                       sample_rate=plan.sample_rate)
        if accountant is not None:
            metrics["epsilon"] = accountant.record_round(plan.noise_multiplier, plan.clip_norm,
                                                         plan.sample_rate, plan.steps, "dpsgd")
    elif cfg.dp == "update":
        gen = None
        if cfg.dp_seed is not None:
            gen = torch.Generator(device=device).manual_seed(cfg.dp_seed)
        update, dp = privatize_update(update, cfg.clip_norm, cfg.noise_multiplier, gen, cfg.noise_fraction)
        metrics.update(clip_scale=dp.clip_scale, noise_std=dp.noise_std)
        if accountant is not None:
            metrics["epsilon"] = accountant.record_round(cfg.own_noise_multiplier, cfg.clip_norm)
    if "epsilon" in metrics:
        metrics.update(delta=accountant.delta, privacy_unit=accountant.unit,
                       epsilon_budget=accountant.epsilon_budget)
    state = {k: (reference[k] + update[k]).to("cpu", torch.float32).numpy() for k in reference}
    log.info("local round: %d samples, %d epochs, loss %.4f, %.1f samples/s%s", len(data), cfg.epochs,
             stats["loss"], stats["samples_per_s"] or 0.0,
             f", epsilon {metrics['epsilon']:.3g} at delta {accountant.delta:g} ({accountant.unit} level)"
             if "epsilon" in metrics else "")
    return LocalResult(state=state, n_samples=len(data), metrics=metrics)


@torch.no_grad()
def predict_proba(model: nn.Module, data: RecordTensors, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and modality weights per patient, averaged over their signal windows."""
    model.eval()
    device = next(model.parameters()).device
    n = len(data)
    probs = torch.zeros(n, model.cfg.num_classes)
    weights = torch.zeros(n, data.mask.shape[1])
    for w in range(data.windows.shape[1]):
        rows = torch.nonzero(data.n_windows > w).flatten()
        for b in range(0, len(rows), batch_size):
            idx = rows[b:b + batch_size]
            inputs = [t.to(device) for t in data.inputs(idx, torch.full_like(idx, w))]
            logits, wts = model(*inputs)
            probs[idx] += torch.softmax(logits, dim=1).cpu()
            weights[idx] += wts.cpu()
    count = data.n_windows.to(torch.float32).unsqueeze(1)
    return (probs / count).numpy(), (weights / count).numpy()


def evaluate(model_cfg: ModelConfig, state: dict[str, np.ndarray], records: list[PatientRecord],
             device: str = "auto") -> dict:
    """Accuracy, macro precision/recall/F1, macro OvR ROC AUC and ``n`` on labelled ``records``."""
    data = records_to_tensors(records, model_cfg, need_label=True)
    model = load_numpy_state(build_model(model_cfg), state).to(resolve_device(device))
    if len(data) == 0:
        return classification_metrics(np.zeros(0), np.zeros((0, model_cfg.num_classes)))
    probs, _ = predict_proba(model, data)
    return classification_metrics(data.labels.numpy(), probs)


def initial_state(model_cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The seeded initial model as a numpy state (e.g. the first global model of a federation)."""
    torch.manual_seed(seed)
    return state_to_numpy(build_model(model_cfg))
