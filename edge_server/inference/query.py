"""Prepare a clinician's encrypted-inference query at the edge.

CrypTen cannot evaluate the LSTM and transformer encoders, so the edge runs the global
model's four modality encoders on its own data and only the attention fusion and the
classifier head are evaluated by the cloud parties, on secret shares of these features
(see cloud_aggregator.inference.models). One row is produced per signal window, exactly
as the local ONNX predictor does; the caller averages the reconstructed probabilities.
"""
from __future__ import annotations

import numpy as np
import torch

from edge_server.training.data import records_to_tensors
from protocols.errors import IomtError
from protocols.model import ModelConfig, build_model, load_numpy_state
from protocols.schema import PatientRecord


class QueryError(IomtError, ValueError):
    """The patient's data cannot form a query (no usable modality, wrong shapes)."""


def fusion_query(model_cfg: ModelConfig, state: dict[str, np.ndarray], record: PatientRecord) -> dict[str, np.ndarray]:
    """``{"features": (W, 4, dim), "mask": (W, 4)}`` for one patient, W = its signal windows."""
    data = records_to_tensors([record], model_cfg, need_label=False)
    if len(data) == 0:
        raise QueryError(f"patient {record.patient_id}: no usable data ({dict(data.skipped)})")
    model = load_numpy_state(build_model(model_cfg), state).eval()
    n_win = int(data.n_windows[0])
    idx = torch.zeros(n_win, dtype=torch.long)
    image, ehr, signals, tokens, mask = data.inputs(idx, torch.arange(n_win))
    with torch.no_grad():
        feats = model.encode(image, ehr, signals, tokens)
    return {"features": feats.numpy().astype(np.float64), "mask": mask.numpy().astype(np.float64)}
