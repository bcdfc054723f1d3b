"""Export the multimodal model to ONNX for ONNX Runtime inference at the edge.

One graph serves every subset of modalities: all five inputs are always fed (zeros where a
modality is missing) and the modality mask decides which features the fusion attends to.
The input names never change; ``tokens`` is what the text encoder reads: the ``(batch,
text_vocab)`` float32 bucket counts of each whole note for the default ``"bag"``, int64
token ids for ``"transformer"``, and for ``"minilm"`` the ``(batch, 384)`` float32 MiniLM note
embedding (the frozen encoder runs before the graph, once per note; see
:mod:`edge_server.dataset.text_embedding`).
The model's :class:`~protocols.model.ModelConfig` travels in the file's metadata, so a
reader can rebuild the tokenizer and name the classes without another file.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from protocols.model import INPUT_NAMES, OUTPUT_NAMES, ModelConfig, build_model, example_inputs, load_numpy_state
from protocols.schema import CONDITIONS, MODALITIES

log = logging.getLogger(__name__)

#: ONNX opset of the exported graph (ONNX Runtime >= 1.14 runs it; LSTM, attention, IsNaN inside).
OPSET = 17
META_CONFIG = "iomt.model_config"
META_CLASSES = "iomt.classes"
META_MODALITIES = "iomt.modalities"


def export_onnx(model_cfg: ModelConfig, state: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write the model with ``state`` to ``path`` (batch size dynamic); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = load_numpy_state(build_model(model_cfg), state).eval()
    dynamic = {name: {0: "batch"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about tracing the
        # transformer's padding-mask branch; neither changes the graph we test against.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example_inputs(model_cfg, 2), str(tmp), input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic, opset_version=OPSET,
                          dynamo=False)
    proto = onnx.load(str(tmp))
    classes = list(CONDITIONS) if model_cfg.num_classes == len(CONDITIONS) else \
        [f"class_{i}" for i in range(model_cfg.num_classes)]
    meta = {META_CONFIG: model_cfg.to_json(), META_CLASSES: json.dumps(classes),
            META_MODALITIES: json.dumps(list(MODALITIES))}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    tmp.unlink(missing_ok=True)
    log.info("exported ONNX model to %s", path)
    return path


def read_metadata(path: str | Path) -> tuple[ModelConfig, list[str]]:
    """The model config and class names stored in an exported file."""
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if META_CONFIG not in meta:
        raise ValueError(f"{path} was not exported by iomt (no {META_CONFIG} metadata)")
    classes = json.loads(meta.get(META_CLASSES, "[]"))
    return ModelConfig.from_json(meta[META_CONFIG]), classes
