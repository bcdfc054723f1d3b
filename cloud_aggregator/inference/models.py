"""Encrypted models a party evaluates, built straight from its share of the global model.

A party holds an additive share of ``S = sum_k n_k * theta_k`` (CrypTen's 16-bit fixed
point in Z_2^64) and the public denominator ``N``. :func:`load_encrypted_model` wraps each
array with ``MPCTensor.from_shares`` and divides by the public ``N`` inside CrypTen, so the
parameters exist only as shares; nothing here ever calls ``get_plain_text`` on them.

* Image models (``arch`` ``resnet18`` / ``alexnet``): the architecture (never the weights)
  is exported to ONNX from :mod:`protocols.vision`, converted by ``crypten.nn.from_onnx``,
  and every parameter is replaced by its shared value.
* The multimodal model (:mod:`protocols.model`): CrypTen cannot run its LSTM and
  transformer encoders, so the cloud evaluates the **attention fusion and the classifier
  head** on secret-shared modality features that the edge computed (see
  :class:`EncryptedFusionHead`); the cloud sees neither the features, the modality mask,
  the weights nor the outputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloud_aggregator.crypten_compat import export_onnx, from_onnx, load_crypten
from cloud_aggregator.inference.errors import InferenceError

log = logging.getLogger(__name__)

VISION_ARCHS = ("resnet18", "alexnet")
#: Newton iterations for BatchNorm's 1/sqrt(var + eps), computed once per loaded model;
#: CrypTen's default (3) is only accurate near var = 1, 16 covers about [1e-4, 200].
BN_SQRT_ITERS = 16
#: Score given to an absent modality before the softmax (kept small: CrypTen's exp is
#: a (1 + x/256)^256 limit and must stay positive).
MISSING_SCORE = -64.0
FUSION_PREFIXES = ("fusion.", "head.")
#: Newton iterations for LayerNorm's 1/sqrt(var): fused features can have variance ~1e-3,
#: where CrypTen's default 3 iterations are far off; 12 reach 1e-4 relative from there.
LN_SQRT_ITERS = 12


@dataclass(frozen=True)
class InputSpec:
    """One input of an encrypted model: name and shape without the batch dimension."""

    name: str
    shape: tuple[int, ...]


def shares_to_mpc(share: np.ndarray, denominator: int, device: str = "cpu") -> Any:
    """An MPCTensor of ``theta = S / N`` from this party's int64 share of ``S``."""
    crypten = load_crypten()
    tensor = torch.from_numpy(np.ascontiguousarray(share, dtype=np.int64)).to(device)
    enc = crypten.mpc.MPCTensor.from_shares(tensor)
    return enc.div(int(denominator)) if denominator != 1 else enc


class EncryptedVisionModel:
    """A ResNet-18 / AlexNet whose parameters are secret-shared (one CrypTen graph per batch shape)."""

    outputs = ("logits",)

    def __init__(self, arch: str, config: dict, params: dict[str, Any], device: str = "cpu") -> None:
        from protocols.vision import build_vision_model

        self.arch = arch
        self.num_classes = int(config.get("num_classes", 1000))
        self.in_channels = int(config.get("in_channels", 3))
        self.image_size = int(config.get("image_size", 224))
        self.inputs = (InputSpec("image", (self.in_channels, self.image_size, self.image_size)),)
        self._skeleton = build_vision_model(arch, self.num_classes, self.in_channels)
        self._state_names = set(self._skeleton.state_dict())
        self._params = params
        self._device = device
        self._graphs: dict[int, Any] = {}

    def _graph(self, batch: int) -> Any:
        if batch in self._graphs:
            return self._graphs[batch]
        crypten = load_crypten()
        example = torch.zeros(batch, self.in_channels, self.image_size, self.image_size)
        graph = from_onnx(export_onnx(self._skeleton, (example,)))
        for name, module in list(graph._modules.items()):
            if type(module).__name__ != "Parameter":
                continue
            if name in self._params:
                module.set_parameter("data", self._params[name]) if "data" in module._parameters \
                    else module.set_buffer("data", self._params[name])
            elif name in self._state_names:
                raise InferenceError("model_mismatch", f"the shared model has no parameter {name!r}")
            # else: a public constant of the architecture (e.g. AlexNet's pooling matrix)
        for module in graph.modules():
            module.encrypted = True
        graph.eval()
        if self._device != "cpu":
            graph = graph.to(self._device)
        with crypten.cfg.temp_override({"functions.sqrt_nr_iters": BN_SQRT_ITERS}):
            _precompute_batchnorm(graph)
        self._graphs[batch] = graph
        return graph

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        image = inputs["image"]
        return {"logits": self._graph(int(image.size(0)))(image)}


def _precompute_batchnorm(graph: Any) -> None:
    """Compute each BatchNorm's shared 1/sqrt(var + eps) once, with enough iterations."""
    for name, module in graph._modules.items():
        if type(module).__name__ != "BatchNormalization":
            continue
        var_name = graph._graph[name][4]
        var = graph._modules[var_name].data
        module.inv_var = var.add(module.eps).inv_sqrt()
        module._running_var_id = id(var)


class EncryptedFusionHead:
    """The multimodal model's attention fusion and classifier head, on CrypTen tensors.

    Mirrors ``protocols.model.AttentionFusion`` and ``MultimodalNet.head`` (eval mode):
    ``s_m = v^T tanh(W f_m + b + e_m)``; absent modalities get score ``MISSING_SCORE`` and
    weight exactly 0 (the shared mask multiplies the exponentials); the max is subtracted
    before CrypTen's exp; LayerNorm uses CrypTen's inv_sqrt; then Linear, ReLU, Linear.
    """

    outputs = ("logits", "modality_weights")

    def __init__(self, config: dict, params: dict[str, Any]) -> None:
        from protocols.schema import MODALITIES

        self.dim = int(config.get("dim", 32))
        self.num_classes = int(config.get("num_classes", 3))
        self.n_mod = len(MODALITIES)
        self.inputs = (InputSpec("features", (self.n_mod, self.dim)), InputSpec("mask", (self.n_mod,)))
        need = ["fusion.modality_embed", "fusion.proj.weight", "fusion.proj.bias", "fusion.score.weight",
                "head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias", "head.4.weight", "head.4.bias"]
        missing = [n for n in need if n not in params]
        if missing:
            raise InferenceError("model_mismatch", f"the shared model lacks {missing}")
        self.p = params

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        p = self.p
        feats, mask = inputs["features"], inputs["mask"]  # (B, M, D), (B, M)
        h = feats.matmul(p["fusion.proj.weight"].t()) + p["fusion.proj.bias"] + p["fusion.modality_embed"]
        scores = h.tanh().matmul(p["fusion.score.weight"].t()).squeeze(-1)  # (B, M)
        scores = scores * mask + (mask - 1) * (-MISSING_SCORE)
        top = scores.max(dim=1, keepdim=True)[0]
        expd = (scores - top).exp() * mask
        total = expd.sum(dim=1, keepdim=True)
        with load_crypten().cfg.temp_override({"functions.reciprocal_all_pos": True}):
            weights = expd * total.reciprocal()
        fused = (weights.unsqueeze(-1) * feats).sum(dim=1)  # (B, D)
        centred = fused - fused.mean(dim=1, keepdim=True)
        var = centred.square().mean(dim=1, keepdim=True)
        with load_crypten().cfg.temp_override({"functions.sqrt_nr_iters": LN_SQRT_ITERS}):
            inv_std = (var + 1e-5).inv_sqrt()
        normed = centred * inv_std * p["head.0.weight"] + p["head.0.bias"]
        hidden = (normed.matmul(p["head.1.weight"].t()) + p["head.1.bias"]).relu()
        logits = hidden.matmul(p["head.4.weight"].t()) + p["head.4.bias"]
        return {"logits": logits, "modality_weights": weights}


def load_encrypted_model(meta: dict, shares: dict[str, np.ndarray], device: str = "cpu") -> Any:
    """The encrypted model described by a global-model ``meta.json`` and this party's shares."""
    model = meta.get("model") or {}
    arch, config = model.get("arch"), dict(model.get("config") or {})
    denominator = int(meta.get("denominator", 1))
    if denominator < 1:
        raise InferenceError("bad_model", f"denominator must be >= 1, got {denominator}")
    if arch in VISION_ARCHS:
        keep = shares
    else:
        keep = {k: v for k, v in shares.items() if k.startswith(FUSION_PREFIXES)}
    params = {name: shares_to_mpc(arr, denominator, device) for name, arr in keep.items()}
    if arch in VISION_ARCHS:
        return EncryptedVisionModel(arch, config, params, device)
    return EncryptedFusionHead(config, params)
