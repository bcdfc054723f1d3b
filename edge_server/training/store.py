"""A trained model on disk: ``<name>.npz`` (state), ``<name>.json`` (config and metrics), ``<name>.onnx``."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edge_server.inference.onnx_export import export_onnx
from protocols.model import ModelConfig

log = logging.getLogger(__name__)

#: Sub-directory of an edge's data dir that holds its models (``local``, ``global``).
MODELS_DIR = "models"


def save_model(directory: str | Path, model_cfg: ModelConfig, state: dict[str, np.ndarray],
               name: str = "local", info: dict | None = None, onnx: bool = True) -> dict[str, Path]:
    """Write the state, the config (with ``info``) and, unless ``onnx=False``, the ONNX export."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"state": directory / f"{name}.npz", "config": directory / f"{name}.json"}
    np.savez(paths["state"], **state)
    meta = {"model_config": json.loads(model_cfg.to_json()), "info": info or {}}
    paths["config"].write_text(json.dumps(meta, indent=1, default=str))
    if onnx:
        paths["onnx"] = export_onnx(model_cfg, state, directory / f"{name}.onnx")
    log.info("saved model %r under %s", name, directory)
    return paths


def load_saved_model(directory: str | Path, name: str = "local") -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The config and state written by :func:`save_model`."""
    directory = Path(directory)
    meta = json.loads((directory / f"{name}.json").read_text())
    with np.load(directory / f"{name}.npz") as npz:
        state = {k: npz[k].astype(np.float32) for k in npz.files}
    return ModelConfig.model_validate(meta["model_config"]), state
