"""Private local training of the multimodal model on an edge's own patients.

Library API used by ``iomt edge train`` and by the federated rounds:

- :class:`~protocols.model.ModelConfig` and :func:`~protocols.model.build_model`: the
  architecture (JSON via ``cfg.to_json()`` / ``ModelConfig.from_json``).
- :class:`TrainConfig`: epochs=10, batch_size=32, lr=1e-3, seed, device="auto", prox_mu
  (FedProx), dp ("sgd": patient-level DP-SGD, :mod:`edge_server.training.dpsgd`; "update":
  the paper's noise on the update; "off"), clip_norm C, noise_multiplier σ, target_epsilon and
  planned_rounds (DP-SGD calibration), delta, epsilon_budget, dp_seed (tests only).
- :func:`split_records` ``(records, seed) -> (train, val, test)``: 70/15/15 by patient.
- :func:`train_local` ``(model_cfg, global_state, train_records, cfg, progress=True,
  accountant=None) -> LocalResult(state, n_samples, metrics)``: ``state`` is
  ``{name: float32 ndarray}`` (today's parameter names also under DP-SGD); with ``dp="update"``
  it is already ``global + clip(Δ, C) + N(0, (σC)²)``.
- :func:`evaluate` ``(model_cfg, state, records) -> dict``: accuracy, precision, recall,
  f1 (macro), roc_auc (macro one-vs-rest), majority_accuracy, n.
- :class:`~edge_server.training.privacy.PrivacyAccountant`: ε at δ (RDP, dp-accounting) over every
  step of every round, persisted under the data dir (``PrivacyAccountant.for_data_dir(d, ...)``);
  ``check_budget(σ, q, steps, mechanism)`` raises :class:`~edge_server.training.privacy.PrivacyBudgetExceeded`.
- :func:`~protocols.model.state_to_numpy` / :func:`~protocols.model.load_numpy_state`:
  float parameters and buffers only, stable names.
- :func:`save_model` / :func:`load_saved_model`: a model directory (state, config, ONNX).
"""
from edge_server.training.privacy import PrivacyAccountant, PrivacyBudgetExceeded
from edge_server.training.data import RecordTensors, records_to_tensors, split_records
from edge_server.training.loop import (
    LocalResult,
    TrainConfig,
    TrainingError,
    evaluate,
    initial_state,
    predict_proba,
    resolve_device,
    train_local,
)
from edge_server.training.store import load_saved_model, save_model
from protocols.model import ModelConfig, build_model, load_numpy_state, state_to_numpy

__all__ = [
    "ModelConfig", "build_model", "state_to_numpy", "load_numpy_state",
    "TrainConfig", "LocalResult", "TrainingError", "train_local", "evaluate", "predict_proba",
    "initial_state", "resolve_device", "split_records", "records_to_tensors", "RecordTensors",
    "PrivacyAccountant", "PrivacyBudgetExceeded", "save_model", "load_saved_model",
]
