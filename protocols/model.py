"""The multimodal model every hospital trains and the cloud aggregates and serves.

Four modality encoders (image CNN, EHR MLP, 2-layer LSTM over standardised wearable windows, and for
clinical notes a fastText-like bag of hashed word and word-pair embeddings over the whole
note, the default, or ``text_encoder="transformer"``, a small transformer over the first
``text_len`` hashed tokens, or ``"minilm"``, a trainable projection of a frozen MiniLM
sentence embedding computed once per note at the edge) each give a ``dim``-sized feature; an attention fusion
layer scores every feature, takes a softmax over the modalities that are *present* (the
modality mask) and returns the weighted sum together with the weights (source paper,
Sec. III-E, eq. 1). ``fusion="quadratic"`` swaps that layer and the head for an
MPC-friendly variant (:class:`QuadraticFusion`) that the cloud's encrypted inference runs
in 12 communication rounds instead of 92. All inputs are always passed (zeros where a
modality is missing), so the same graph exports to ONNX and serves every subset of
modalities.

State dicts cross process boundaries as ``{name: float32 ndarray}``
(:func:`state_to_numpy`); integer buffers (BatchNorm's ``num_batches_tracked``) are left
out so that the cloud can average everything it receives. The MiniLM weights are never part
of the model: only the projection is trained, federated and secret-shared.
"""
from __future__ import annotations

import json
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from protocols.schema import (
    EHR_DIM,
    IMAGE_SIZE,
    MODALITIES,
    NUM_CLASSES,
    SIGNAL_CHANNELS,
    SIGNAL_REFERENCE,
    WINDOW_SAMPLES,
)
from protocols.text import PAD_ID, HashingTokenizer, NgramBag

__all__ = [
    "ModelConfig",
    "MultimodalNet",
    "build_model",
    "state_to_numpy",
    "load_numpy_state",
    "example_inputs",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "MINILM_DIM",
]

#: Names of the forward inputs and outputs, in order (also the ONNX graph's names).
INPUT_NAMES: tuple[str, ...] = ("image", "ehr", "signals", "tokens", "mask")
OUTPUT_NAMES: tuple[str, ...] = ("logits", "modality_weights")

#: Size of the frozen MiniLM (all-MiniLM-L6-v2) sentence embedding fed as the ``tokens``
#: input when ``ModelConfig.text_encoder == "minilm"``.
MINILM_DIM = 384

#: Score given to a missing modality before the softmax; far below any real score but
#: finite, so that exported graphs never compute ``inf - inf``.
_MISSING_SCORE = -1.0e4


class ModelConfig(BaseModel):
    """Architecture hyper-parameters; JSON-serialisable and shared by edge and cloud."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_classes: int = Field(NUM_CLASSES, ge=2)
    dim: int = Field(32, ge=4, description="size of every modality feature and the fused vector")
    image_encoder: Literal["cnn", "resnet18", "alexnet"] = "cnn"
    image_size: int = Field(IMAGE_SIZE, ge=16)
    cnn_channels: tuple[int, int, int] = (8, 16, 32)
    cnn_grid: int = Field(4, ge=1, description=(
        "side of the grid the CNN's last feature map (image_size / 8) is average-pooled to before the "
        "projection; 1 is a global average pool, which discards where structures are (issue 17)"))
    ehr_dim: int = Field(EHR_DIM, ge=1)
    ehr_hidden: int = Field(32, ge=4)
    signal_channels: int = Field(len(SIGNAL_CHANNELS), ge=1)
    signal_len: int = Field(WINDOW_SAMPLES, ge=1)
    signal_pool: int = Field(4, ge=1, description="average-pool factor before the LSTM (25 Hz -> 6.25 Hz)")
    lstm_hidden: int = Field(32, ge=4)
    lstm_layers: int = Field(2, ge=1)
    text_vocab: int = Field(2048, ge=8, description="hash buckets of words and word pairs (bag, transformer)")
    text_len: int = Field(48, ge=2, description="transformer only: tokens kept per note, the rest dropped")
    text_layers: int = Field(2, ge=1, description="transformer only")
    text_heads: int = Field(2, ge=1, description="transformer only")
    text_encoder: Literal["bag", "transformer", "minilm"] = Field(
        "bag", description='"bag": trainable mean of the embeddings of every hashed word and word pair of '
        "the whole note (input `tokens` is then the note's (text_vocab,) float bucket counts); "
        '"transformer": trainable, over the first text_len hashed tokens (int64 ids); "minilm": trainable '
        "projection of a frozen 384-d MiniLM note embedding (input `tokens` is then that embedding)")
    fusion: Literal["attention", "quadratic"] = Field(
        "attention", description='"attention": the source paper\'s additive attention (tanh scores, softmax '
        "over present modalities) and a LayerNorm head; \"quadratic\": scores linear in each feature, "
        "weights proportional to 1 + score^2 over present modalities and a head without LayerNorm, which "
        "the cloud evaluates under MPC in about a sixth of the rounds (cloud_aggregator.inference.models)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_grid(self):
        side = self.image_size // 8
        if self.image_encoder == "cnn" and (self.image_size % 8 or side % self.cnn_grid):
            raise ValueError(f"cnn_grid {self.cnn_grid} must divide the CNN's last feature map side "
                             f"image_size / 8 = {self.image_size / 8:g}")
        return self

    def tokenizer(self) -> HashingTokenizer | NgramBag:
        """What turns notes into this model's ``tokens`` input (``encode_batch``): bucket
        counts for the bag, token ids for the transformer (not for minilm: its input is the
        frozen encoder's embedding, :mod:`edge_server.dataset.text_embedding`)."""
        if self.text_encoder == "minilm":
            raise ValueError("a minilm model reads note embeddings, not tokens")
        if self.text_encoder == "bag":
            return NgramBag(vocab_size=self.text_vocab)
        return HashingTokenizer(vocab_size=self.text_vocab, max_len=self.text_len)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelConfig:
        return cls.model_validate(json.loads(text))


class SmallCNN(nn.Module):
    """Three conv + GroupNorm + ReLU + max-pool stages, then an average pool to a
    ``grid x grid`` map that is flattened into the projection (paper Sec. III-B's CNN).

    Why not a global average pool: the findings that separate the conditions are where
    things are and how wide they are (a heart wider than usual, opacities in the lung
    fields), and averaging the whole map left a between-patient variation of about
    2 % of the feature at initialisation, which the model took a hundred or more Adam steps to pick up at
    all, far more than a federated round gives it (issue 17). GroupNorm (one group, i.e.
    per image) rather than BatchNorm, which mixes patients and has no patient-level DP-SGD.
    The first convolution has stride 2: at 64x64 it quarters the cost of every stage, and
    the findings are far coarser than 2 pixels. ReLU convolutions start from He's
    initialisation, so that the image reaches the projection undamped.
    """

    def __init__(self, channels: tuple[int, int, int], dim: int, image_size: int = IMAGE_SIZE, grid: int = 4) -> None:
        super().__init__()
        c1, c2, c3 = channels
        side = image_size // 8
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.GroupNorm(1, c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(1, c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.GroupNorm(1, c3), nn.ReLU(),
            nn.AvgPool2d(side // grid),  # a fixed kernel: plain AveragePool in ONNX, any batch size
        )
        self.proj = nn.Linear(c3 * grid * grid, dim)
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(image).flatten(1))


class EhrMLP(nn.Module):
    """MLP over standardised EHR features; NaN (absent) -> 0 plus a missing indicator."""

    def __init__(self, n_features: int, hidden: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * n_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, ehr: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(ehr)
        values = torch.where(missing, torch.zeros_like(ehr), ehr)
        return self.net(torch.cat([values, missing.to(ehr.dtype)], dim=1))


class SignalLSTM(nn.Module):
    """Two-layer LSTM over a ``(T, C)`` wearable window; the last hidden state is the feature.

    Each channel is first standardised with its fixed reference centre and scale
    (:data:`protocols.schema.SIGNAL_REFERENCE`), zeros (a channel not recorded, a lost
    frame) staying 0. The channels come in their own units, a skin temperature near
    34 degrees C beside an ECG of 0.1 mV: a LayerNorm across channels at each time step
    (the encoder's first version) left every channel but temperature at a few percent
    of the scale, and the branch stayed at chance (issue 17). The reference is a
    constant of the architecture, not a parameter: it is neither trained, averaged nor
    noised, and ONNX carries it as a constant.
    """

    def __init__(self, channels: int, pool: int, hidden: int, layers: int, dim: int, dropout: float) -> None:
        super().__init__()
        centre, scale = torch.zeros(channels), torch.ones(channels)
        if channels == len(SIGNAL_CHANNELS):
            centre = torch.tensor([SIGNAL_REFERENCE[c][0] for c in SIGNAL_CHANNELS])
            scale = torch.tensor([SIGNAL_REFERENCE[c][1] for c in SIGNAL_CHANNELS])
        self.register_buffer("centre", centre, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.pool = nn.AvgPool1d(pool, stride=pool) if pool > 1 else nn.Identity()
        self.lstm = nn.LSTM(channels, hidden, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        x = torch.where(signals != 0, (signals - self.centre) / self.scale, torch.zeros_like(signals))
        x = self.pool(x.transpose(1, 2)).transpose(1, 2)  # (B, T/pool, C)
        out, _ = self.lstm(x)
        return self.proj(out[:, -1])


class TextTransformer(nn.Module):
    """Small transformer encoder over hashed token ids, mean-pooled over non-padding tokens."""

    def __init__(self, vocab: int, length: int, dim: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=PAD_ID)
        self.pos = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == PAD_ID
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        x = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).to(x.dtype).unsqueeze(-1)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.norm(pooled)


class NgramBagEncoder(nn.Module):
    """fastText-like (Joulin et al., 2017): the weighted mean of the embeddings of every
    hashed word and word pair of the whole note, then LayerNorm.

    The input is the note's bucket counts ``(B, vocab)`` (:class:`protocols.text.NgramBag`);
    each count ``c`` weighs its bucket's embedding by ``log(1 + c)`` (sublinear term
    frequency, as TF-IDF baselines use), normalised to sum 1. The embedding table is the
    weight of a bias-free ``nn.Linear`` (``embed.weight[:, j]`` is bucket ``j``'s vector), so
    the lookup is one dense matrix product: its per-patient gradient is an exact outer
    product (``torch.func`` and Opacus both get it right), unlike ``nn.EmbeddingBag``'s with
    repeated ids, and it exports to ONNX as a MatMul.
    """

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(vocab, dim, bias=False)
        # small, not nn.Embedding's N(0, 1): the LayerNorm makes the output blind to the table's
        # scale, so Adam's steps (about lr each) move it in proportion to 1/std; with N(0, 1) the
        # bag under-learned (57 % vs 89 % on tests/edge_server/test_training.py's patients, 91 %
        # vs 94 % on real radiology reports); 0.1 keeps the pooled variance of a long note well
        # above the LayerNorm's eps
        nn.init.normal_(self.embed.weight, std=0.1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        weights = torch.log1p(counts.clamp_min(0.0))
        # an empty note (all zeros; its text mask is 0) gives the LayerNorm of zeros, not NaN
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.norm(self.embed(weights))


class EmbeddingProjection(nn.Module):
    """Trainable projection of a frozen sentence embedding (MiniLM, ``MINILM_DIM``) to ``dim``.

    The sentence encoder itself stays outside the model (computed once per note at the
    edge), so its weights are neither trained nor federated.
    """

    def __init__(self, in_dim: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, dim), nn.LayerNorm(dim))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)


class AttentionFusion(nn.Module):
    """Additive attention over modality features with a softmax restricted by the mask.

    ``score_m = v^T tanh(W f_m + e_m)`` with a learned embedding ``e_m`` per modality; the
    weights are exactly 0 for missing modalities and sum to 1 over present ones.
    """

    def __init__(self, n_modalities: int, dim: int) -> None:
        super().__init__()
        self.modality_embed = nn.Parameter(torch.zeros(n_modalities, dim))
        self.proj = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(torch.tanh(self.proj(feats) + self.modality_embed)).squeeze(-1)  # (B, M)
        present = mask > 0.5
        scores = torch.where(present, scores, torch.full_like(scores, _MISSING_SCORE))
        weights = torch.softmax(scores, dim=1) * present.to(scores.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        fused = (weights.unsqueeze(-1) * feats).sum(dim=1)
        return fused, weights


class QuadraticFusion(nn.Module):
    """Attention with weights an MPC computes without exp, tanh, division or a secure comparison.

    ``s_m = u_m . f_m`` (a score vector per modality) and
    ``w_m = mask_m (1 + s_m^2) / sum_k mask_k (1 + s_k^2)``: exactly 0 for missing
    modalities, summing to 1 over present ones, uniform when all scores are 0. There is no
    score bias: the encoders' output biases already give each modality a learnable offset,
    and without one a missing modality's zero features score exactly 0, which lets the
    encrypted path apply the mask with an addition instead of a multiplication
    (``mask (1 + s^2) = mask + s^2`` there). Every present term is >= 1, so the denominator
    is >= 1 whenever a modality is present; the encrypted path never divides by it (the
    client does, see ``cloud_aggregator.inference.models.EncryptedQuadraticHead``).
    """

    def __init__(self, n_modalities: int, dim: int) -> None:
        super().__init__()
        # not zeros: d(1 + s^2)/ds is 0 at s = 0, so zero scores would never move
        self.score_weight = nn.Parameter(torch.randn(n_modalities, dim) * dim ** -0.5)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (feats * self.score_weight).sum(dim=-1)  # (B, M)
        terms = (mask > 0.5).to(scores.dtype) * (1 + scores * scores)
        weights = terms / terms.sum(dim=1, keepdim=True).clamp_min(1e-12)
        fused = (weights.unsqueeze(-1) * feats).sum(dim=1)
        return fused, weights


class MultimodalNet(nn.Module):
    """Image, EHR, signal and text encoders, a fusion layer (attention or quadratic) and a classifier head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = _image_encoder(cfg)
        self.ehr_encoder = EhrMLP(cfg.ehr_dim, cfg.ehr_hidden, cfg.dim, cfg.dropout)
        self.signal_encoder = SignalLSTM(cfg.signal_channels, cfg.signal_pool, cfg.lstm_hidden,
                                         cfg.lstm_layers, cfg.dim, cfg.dropout)
        self.text_encoder = _text_encoder(cfg)
        if cfg.fusion == "quadratic":
            self.fusion = QuadraticFusion(len(MODALITIES), cfg.dim)
            self.head = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.ReLU(),
                                      nn.Dropout(cfg.dropout), nn.Linear(cfg.dim, cfg.num_classes))
        else:
            self.fusion = AttentionFusion(len(MODALITIES), cfg.dim)
            self.head = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.dim), nn.ReLU(),
                                      nn.Dropout(cfg.dropout), nn.Linear(cfg.dim, cfg.num_classes))

    def encode(self, image: torch.Tensor, ehr: torch.Tensor, signals: torch.Tensor,
               tokens: torch.Tensor) -> torch.Tensor:
        """The four modality features ``(B, 4, dim)`` in ``MODALITIES`` order: what the edge
        computes for an encrypted query, whose fusion and head then run in the cloud."""
        return torch.stack([self.image_encoder(image), self.ehr_encoder(ehr), self.signal_encoder(signals),
                            self.text_encoder(tokens)], dim=1)

    def forward(self, image: torch.Tensor, ehr: torch.Tensor, signals: torch.Tensor,
                tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``(B, num_classes)`` and modality weights ``(B, 4)``.

        Parameters
        ----------
        image: ``(B, 1, S, S)`` float; ehr: ``(B, ehr_dim)`` float, NaN = absent feature;
        signals: ``(B, T, C)`` float; tokens: what the config's tokenizer gives, ``(B, text_vocab)``
        float32 bucket counts (bag) or ``(B, text_len)`` int64 ids (transformer), or for
        ``text_encoder="minilm"`` the ``(B, MINILM_DIM)`` float32 note embeddings;
        mask: ``(B, 4)`` float, 1 where the modality (in ``MODALITIES`` order) is present.
        """
        fused, weights = self.fusion(self.encode(image, ehr, signals, tokens), mask)
        return self.head(fused), weights


def _image_encoder(cfg: ModelConfig) -> nn.Module:
    if cfg.image_encoder == "cnn":
        return SmallCNN(cfg.cnn_channels, cfg.dim, cfg.image_size, cfg.cnn_grid)
    # ResNet-18 / AlexNet with their classifier sized to the feature dimension.
    from protocols.vision import build_vision_model
    return build_vision_model(cfg.image_encoder, num_classes=cfg.dim, in_channels=1)


def _text_encoder(cfg: ModelConfig) -> nn.Module:
    if cfg.text_encoder == "minilm":
        return EmbeddingProjection(MINILM_DIM, cfg.dim, cfg.dropout)
    if cfg.text_encoder == "bag":
        return NgramBagEncoder(cfg.text_vocab, cfg.dim)
    return TextTransformer(cfg.text_vocab, cfg.text_len, cfg.dim, cfg.text_layers, cfg.text_heads, cfg.dropout)


def build_model(cfg: ModelConfig | None = None) -> MultimodalNet:
    """A freshly initialised model (seed torch first for a deterministic initialisation)."""
    return MultimodalNet(cfg or ModelConfig())


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Parameters and floating-point buffers as float32 arrays, in a stable order."""
    return {
        name: t.detach().to("cpu", torch.float32).numpy().copy()
        for name, t in model.state_dict().items()
        if t.is_floating_point()
    }


def load_numpy_state(model: nn.Module, state: dict[str, np.ndarray]) -> nn.Module:
    """Load a :func:`state_to_numpy` dict into ``model``; names and shapes must match exactly."""
    own = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tensors = {}
    for name, ref in own.items():
        arr = np.asarray(state[name])
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"state {name!r} has shape {arr.shape}, model expects {tuple(ref.shape)}")
        tensors[name] = torch.as_tensor(arr, dtype=ref.dtype, device=ref.device)
    model.load_state_dict(tensors, strict=False)
    return model


def example_inputs(cfg: ModelConfig, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Zero inputs of the right shapes (all modalities present), e.g. for ONNX export."""
    if cfg.text_encoder == "minilm":
        tokens = torch.zeros(batch, MINILM_DIM)
        tokens[:, 0] = 1.0
    elif cfg.text_encoder == "bag":
        tokens = torch.zeros(batch, cfg.text_vocab)
        tokens[:, 0] = 1.0
    else:
        tokens = torch.zeros(batch, cfg.text_len, dtype=torch.int64)
        tokens[:, 0] = 1
    return (
        torch.zeros(batch, 1, cfg.image_size, cfg.image_size),
        torch.zeros(batch, cfg.ehr_dim),
        torch.zeros(batch, cfg.signal_len, cfg.signal_channels),
        tokens,
        torch.ones(batch, len(MODALITIES)),
    )
