"""Patient-level DP-SGD for the multimodal model (Abadi et al., 2016), with Opacus.

The privacy unit is one patient. Every step draws a Poisson sample of the hospital's
patients (each independently with probability ``q = batch_size / N``), takes **one** signal
window per sampled patient (never several windows of one patient as separate examples),
computes each patient's gradient, clips it to L2 norm ``C``, sums, adds ``N(0, (σC)²)`` and
divides by the expected batch size (Opacus' :class:`~opacus.optimizers.DPOptimizer`).
One step is then a Poisson-subsampled Gaussian mechanism on add/remove-one-patient
neighbours, and :class:`~edge_server.training.privacy.PrivacyAccountant` composes every step.

Per-patient gradients come from ``torch.func`` (``vmap`` of ``grad`` over the whole model,
as Opacus' functorch grad sampler does per layer), so every module is covered exactly:
convolutions, LayerNorm, embeddings, the text encoder's attention with its boolean padding
mask, and the LSTM, which training swaps for Opacus' :class:`~opacus.layers.DPLSTM` (the
same parameter names as ``nn.LSTM``, built of linear layers that ``vmap`` batches; ``nn.LSTM``
would fall back to a per-example loop). The state the hospital releases therefore has
today's names: ONNX export, secret sharing and encrypted inference do not change.

BatchNorm mixes patients within a batch, so models with it (``image_encoder="resnet18"``)
are refused; the default CNN has none.

Noise and sampling draw their seeds from the operating system; ``dp_seed`` (tests only)
makes them reproducible.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch
from opacus.layers import DPLSTM
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from edge_server.training.privacy import calibrate_noise
from edge_server.training.data import RecordTensors

log = logging.getLogger(__name__)

#: Patients whose per-example gradients are computed at once (bounds the memory of a step).
CHUNK = 64


class DpSgdUnsupported(ValueError):
    """The model has a layer that DP-SGD cannot train privately (BatchNorm)."""


@dataclass(frozen=True, slots=True)
class DpSgdPlan:
    """How one local round runs under DP-SGD, and what it costs.

    ``sample_rate`` is ``q = batch_size / n``; ``steps`` the number of steps of one round
    (``epochs · ⌈1/q⌉``); ``noise_multiplier`` σ, calibrated once for the whole planned run.
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int
    n_patients: int


def plan(n_patients: int, batch_size: int, epochs: int, clip_norm: float, *, delta: float,
         noise_multiplier: float | None = None, target_epsilon: float | None = None,
         planned_rounds: int = 1) -> DpSgdPlan:
    """Sampling rate, steps per round and σ; σ is explicit or calibrated so that
    ``planned_rounds`` rounds spend at most ``target_epsilon`` at ``delta``."""
    if n_patients < 1:
        raise ValueError("DP-SGD needs at least one patient")
    q = min(1.0, batch_size / n_patients)
    steps = epochs * math.ceil(1.0 / q)
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("DP-SGD needs a noise multiplier or a target epsilon")
        noise_multiplier = calibrate_noise(target_epsilon, delta, q, steps * planned_rounds)
    return DpSgdPlan(noise_multiplier=float(noise_multiplier), clip_norm=float(clip_norm), sample_rate=q,
                     steps=steps, n_patients=n_patients)


def make_private_trainable(model: nn.Module) -> nn.Module:
    """Swap every ``nn.LSTM`` of ``model`` (in place) for an Opacus ``DPLSTM`` with the same
    weights and parameter names; refuse BatchNorm. Returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise DpSgdUnsupported(f"{name} is a BatchNorm layer, which mixes patients within a batch and "
                                   "has no patient-level DP-SGD; use the default image encoder (cnn)")
        for child_name, child in list(module.named_children()):
            if type(child) is nn.LSTM:
                if not child.batch_first or child.bidirectional or child.proj_size:
                    raise DpSgdUnsupported(f"{name}.{child_name}: only batch-first one-way LSTMs are supported")
                dp = DPLSTM(child.input_size, child.hidden_size, num_layers=child.num_layers,
                            bias=child.bias, batch_first=True, dropout=child.dropout)
                dp.load_state_dict(child.state_dict())
                setattr(module, child_name, dp.to(next(child.parameters()).device))
    return model


def per_example_grads(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor,
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({name: (B, *param.shape)}, (B,) losses)``: each example's gradient of its own
    cross-entropy loss, and that loss."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_one(p, b, *example):
        *xs, y = example
        logits, _ = functional_call(model, (p, b), tuple(t.unsqueeze(0) for t in xs))
        loss = nn.functional.cross_entropy(logits, y.unsqueeze(0))
        return loss, loss.detach()

    dims = (None, None) + (0,) * (len(inputs) + 1)
    # the math attention kernel is plain matmuls and softmax, which vmap batches; the fused
    # CPU kernels have no batching rule and would run one example at a time
    with sdpa_kernel(SDPBackend.MATH):
        return vmap(grad(loss_one, has_aux=True), in_dims=dims, randomness="different")(
            params, buffers, *inputs, labels)


def _os_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1) if seed is None else seed)
    return gen


def fit_dpsgd(model: nn.Module, data: RecordTensors, dp: DpSgdPlan, *, lr: float, weight_decay: float,
              device: torch.device, prox_mu: float = 0.0,
              global_params: dict[str, torch.Tensor] | None = None, dp_seed: int | None = None,
              progress_bar=None) -> dict:
    """Run ``dp.steps`` DP-SGD steps (Adam on the privatised gradient) on ``data``, in place.

    The FedProx term ``μ/2 ||w - w_global||²`` does not depend on any patient, so its
    gradient is added after the noise (post-processing, no privacy cost).
    """
    make_private_trainable(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    n = len(data)
    noise_gen = _os_generator(dp_seed, device)
    sample_gen = _os_generator(None if dp_seed is None else dp_seed + 1, torch.device("cpu"))
    opt = DPOptimizer(torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
                      noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                      expected_batch_size=max(1, round(dp.sample_rate * n)), loss_reduction="mean",
                      generator=noise_gen)
    prox = [(p, global_params[name]) for name, p in zip(names, params)] \
        if prox_mu > 0 and global_params is not None else []
    sampled = clipped = 0
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(dp.steps):
        chosen = torch.nonzero(torch.rand(n, generator=sample_gen) < dp.sample_rate).flatten()
        window = (torch.rand(len(chosen), generator=sample_gen) * data.n_windows[chosen].cpu()).long()
        chosen, window = chosen.to(device), window.to(device)
        opt.zero_grad(set_to_none=True)
        if len(chosen):
            parts = [per_example_grads(model, data.inputs(chosen[c:c + CHUNK], window[c:c + CHUNK]),
                                       data.labels[chosen[c:c + CHUNK]]) for c in range(0, len(chosen), CHUNK)]
            per = {k: torch.cat([g[k] for g, _ in parts]) for k in parts[0][0]}
            losses.append(float(torch.cat([loss for _, loss in parts]).mean()))
            norms = torch.linalg.vector_norm(torch.stack(
                [per[k].reshape(len(chosen), -1).norm(dim=1) for k in names], dim=1), dim=1)
            clipped += int((norms > dp.clip_norm).sum())
        else:  # an empty Poisson sample: the step is noise only (still accounted)
            per = {k: torch.zeros((1, *p.shape), device=p.device, dtype=p.dtype) for k, p in zip(names, params)}
        for k, p in zip(names, params):
            p.grad_sample = per[k]
        sampled += len(chosen)
        if opt.pre_step():
            if prox:
                # FedProx (Li et al., 2020), on the already private gradient
                for p, g in prox:
                    p.grad.add_(p.detach() - g, alpha=prox_mu)
            opt.original_optimizer.step()
        if progress_bar is not None:
            progress_bar.update(1)
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"loss": losses[-1] if losses else float("nan"), "steps": dp.steps, "seconds": seconds,
            "samples_per_s": sampled / seconds if seconds > 0 else None, "patients_sampled": sampled,
            "clipped_fraction": clipped / sampled if sampled else 0.0}
