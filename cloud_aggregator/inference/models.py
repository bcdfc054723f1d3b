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
  :class:`EncryptedFusionHead`, 92 rounds, or for a ``fusion="quadratic"`` model
  :class:`EncryptedQuadraticHead`, 12 rounds); the cloud sees neither the features, the
  modality mask, the weights nor the outputs.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloud_aggregator.crypten_compat import export_onnx, from_onnx, load_crypten
from cloud_aggregator.inference.errors import InferenceError
from cloud_aggregator.mpc.functions import inv_sqrt
from cloud_aggregator.inference.ranges import BN_VAR_RANGE, SCALED_MAX, shared_any_outside, shared_weight_violations
from protocols.model_files import GlobalModelMeta

log = logging.getLogger(__name__)

VISION_ARCHS = ("resnet18", "alexnet")
#: Newton iterations for BatchNorm's 1/sqrt(var + eps), computed once per loaded model
#: when folding it into the convolution; CrypTen's default (3) is only accurate near
#: var = 1, 16 cover about [1e-4, 204] (ranges.BN_VAR_RANGE).
BN_SQRT_ITERS = 16
FUSION_PREFIXES = ("fusion.", "head.")
#: Iterations for LayerNorm's 1/sqrt(var): fused features can have variance ~1e-3, where
#: CrypTen's default 3 are far off; from CrypTen's initial guess 12 coupled (Goldschmidt)
#: iterations reach 1e-3 relative on [0.01, 200], 6e-3 at 1e-3 and 5 % at 2e-4; past 204.8 the
#: guess is negative (ranges.LN_VAR_RANGE, checked by the client on every answer).
LN_SQRT_ITERS = 12
#: exp(x) = exp(x / 2^k)^(2^k); with k = 4 the Taylor step sees |x / 16| <= 1 for |x| <= 16.
EXP_SQUARINGS = 4
#: Goldschmidt iterations for the softmax denominator (a sum of exponentials of centred
#: scores, > 0): from CrypTen's initial guess, 10 iterations give the weights to 1e-3 for a
#: denominator in [0.05, 500] (tests/cloud_aggregator/test_mpc_functions.py); the guess's
#: exp breaks above 512, and below ~0.05 the exponentials have few bits in 16-bit fixed point.
RECIPROCAL_ITERS = 10
#: degree of the polynomial for (1 - t) / (1 + t) on [0, 1] in tanh (max error ~1e-5)
TANH_DEGREE = 7
#: beyond |x| = TANH_CLIP, tanh(x) = sign(x) to 2.3e-7 (selected by a secure comparison)
TANH_CLIP = 8.0
#: squarings of tanh's exp(-2|x|) for |x| <= TANH_CLIP: the Taylor step sees x / 8 >= -2; measured
#: max error 1.3e-4 on a grid to |x| = 2^30 (4 and 5 squarings: 2.1e-4, 3.8e-4: more rounding amplified)
TANH_EXP_SQUARINGS = 3
#: squarings in that initial guess's exp, (1 + x / 2^8)^(2^8), as CrypTen's default
EXP_LIMIT_SQUARINGS = 8


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
    """A ResNet-18 / AlexNet whose parameters are secret-shared (one CrypTen graph per batch shape).

    The parties never evaluate a BatchNorm: on the first request each one is folded into the
    convolution before it (:func:`fold_shared_batchnorm`, on shares, once per loaded model),
    and the graph is exported from the folded architecture
    (:func:`protocols.vision.fold_batchnorm`). A model published already folded
    (config ``batchnorm_folded``) is used as it is. Besides removing per-request work this
    fixes accuracy: CrypTen 0.4.1's ``BatchNormalization`` tests ``not self.train`` (a bound
    method, always true), so it dropped any precomputed ``1/sqrt(var + eps)`` and recomputed
    it on every request with the default 3 Newton iterations, 1.6 % off for a trained
    ResNet-18's variances (0.07..26); that was its 0.035-0.06 logit error at 64x64.
    """

    outputs = ("logits",)

    def __init__(self, arch: str, config: dict, params: dict[str, Any], device: str = "cpu") -> None:
        from protocols.vision import build_vision_model, conv_batchnorm_pairs, fold_batchnorm

        self.arch = arch
        self.num_classes = int(config.get("num_classes", 1000))
        self.in_channels = int(config.get("in_channels", 3))
        self.image_size = int(config.get("image_size", 224))
        self.inputs = (InputSpec("image", (self.in_channels, self.image_size, self.image_size)),)
        skeleton = build_vision_model(arch, self.num_classes, self.in_channels).eval()
        modules = dict(skeleton.named_modules())
        # (conv, batchnorm, eps) still to fold on shares; none if the publisher folded them
        self._pairs = [] if config.get("batchnorm_folded") else \
            [(conv, bn, float(modules[bn].eps)) for conv, bn in conv_batchnorm_pairs(skeleton)]
        self._skeleton = fold_batchnorm(skeleton)
        self._state_names = set(self._skeleton.state_dict())
        self._params = params
        self._device = device
        self._graphs: dict[int, Any] = {}
        self._refusal: str | None = None

    def prepare(self) -> None:
        """Fold the BatchNorms on shares (collective: the worker calls it once every party accepted a request).

        Raises ``InferenceError("model_out_of_range")``, now and for every later request, when
        a running variance is outside the fold's 1/sqrt range (:data:`ranges.BN_VAR_RANGE`).
        """
        if self._refusal is not None:
            raise InferenceError("model_out_of_range", self._refusal)
        if self._pairs:
            with _untraced():
                try:
                    self._params = fold_shared_batchnorm(self._params, self._pairs)
                except InferenceError as err:
                    if err.reason == "model_out_of_range":
                        self._refusal = err.detail
                        log.warning("refusing model for encrypted serving: %s", err.detail)
                    raise
            self._pairs = []

    def _graph(self, batch: int) -> Any:
        if batch in self._graphs:
            return self._graphs[batch]
        self.prepare()
        example = torch.zeros(batch, self.in_channels, self.image_size, self.image_size)
        graph = from_onnx(export_onnx(self._skeleton, (example,)))
        for name, module in list(graph._modules.items()):
            kind = type(module).__name__
            if kind == "BatchNormalization":
                raise InferenceError("model_mismatch", f"BatchNorm {name!r} was not folded")
            if kind != "Parameter":
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
        self._graphs[batch] = graph
        return graph

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        image = inputs["image"]
        return {"logits": self._graph(int(image.size(0)))(image)}


def fold_shared_batchnorm(params: dict[str, Any], pairs: list[tuple[str, str, float]]) -> dict[str, Any]:
    """Fold each eval-mode BatchNorm into its convolution, on shares: exact algebra, done once.

    ``BN(conv(x)) = conv'(x)`` with weight ``W * a`` and bias ``beta + a * (b - mean)``,
    ``a = gamma / sqrt(var + eps)`` per output channel. A global model is the average of
    several hospitals' models and the folding is not linear in them, so it cannot be done
    per hospital before sharing: the parties compute it on the shared average (one batched
    ``1/sqrt`` with :data:`BN_SQRT_ITERS` Newton iterations for all layers, then one
    multiplication per convolution). Returns the parameters of the folded architecture;
    raises ``InferenceError("model_out_of_range")`` when a variance is outside
    :data:`ranges.BN_VAR_RANGE` (one opened bit says so).
    """
    crypten = load_crypten()
    if not pairs:
        return dict(params)
    for _, bn, _ in pairs:
        missing = [f"{bn}.{k}" for k in ("weight", "bias", "running_mean", "running_var") if f"{bn}.{k}" not in params]
        if missing:
            raise InferenceError("model_mismatch", f"the shared model lacks {missing}")
    cat = [crypten.cat([params[f"{bn}.{k}"] for _, bn, _ in pairs]) for k in ("weight", "bias", "running_mean")]
    var = crypten.cat([params[f"{bn}.running_var"].add(eps) for _, bn, eps in pairs])
    if shared_any_outside(var, *BN_VAR_RANGE):  # opens this one bit
        raise InferenceError("model_out_of_range", "this model version cannot be evaluated encrypted: a BatchNorm "
                             f"running variance is outside {BN_VAR_RANGE[0]:g}..{BN_VAR_RANGE[1]:g}, where the "
                             "fold's 1/sqrt is valid")
    inv_std = inv_sqrt(var, BN_SQRT_ITERS, method="newton")
    gamma, beta, mean = cat
    scale = gamma * inv_std
    shift = beta - scale * mean
    out = {k: v for k, v in params.items() if not any(k.startswith(f"{bn}.") for _, bn, _ in pairs)}
    start = 0
    for conv, _, _ in pairs:
        weight = params[f"{conv}.weight"]
        n = int(weight.size(0))
        a, b = scale[start:start + n], shift[start:start + n]
        start += n
        out[f"{conv}.weight"] = weight * a.reshape(n, *([1] * (weight.dim() - 1)))
        conv_bias = params.get(f"{conv}.bias")
        out[f"{conv}.bias"] = b if conv_bias is None else b + a * conv_bias
    return out


class EncryptedFusionHead:
    """The multimodal model's attention fusion and classifier head, on CrypTen tensors.

    Mirrors ``protocols.model.AttentionFusion`` and ``MultimodalNet.head`` (eval mode):
    ``s_m = v^T tanh(W f_m + b + e_m)``; absent modalities get weight exactly 0 (the shared
    mask multiplies the exponentials). Written for few communication rounds (each
    multiplication of two shared values costs one round plus a triple from the TTP); every
    step is exact algebra, so the function is the plaintext model's:

    * the softmax subtracts the *mean* score (linear, free) instead of the max (a tree of
      secure comparisons, ~180 rounds); the exponent stays small: tanh is in [-1, 1], so
      ``|s_m - mean(s)| <= 1.5 ||v||_1``; with the reciprocal's range the head is valid for
      ``||v||_1 <= 4.14`` (``ranges.score_norm_limit``; a trained dim-32 model: 2.8), which
      :meth:`prepare` checks on shares;
    * exp is a degree-7 Taylor polynomial of ``x / 16`` (powers batched two per round) and
      4 squarings, instead of 8 squarings of ``1 + x / 256`` (also more accurate);
    * the softmax's division is a Goldschmidt division of the stacked numerators
      ``[exp(s) * mask, sum_m exp(s_m) mask_m f_m]`` by their sum: one round per iteration
      (Newton's reciprocal takes two, then one more to multiply), and it yields the modality
      weights and the fused features at once;
    * LayerNorm's 1/sqrt uses coupled Goldschmidt iterations: 2 rounds each, not Newton's 3;
      its affine scale is folded into the first head layer once per model (:meth:`prepare`:
      ``W1 (g * c / sigma + beta) + b1 = (W1 diag(g) c) / sigma + (W1 beta + b1)``), and
      ``c^2`` and ``W1 diag(g) c`` are computed in the same round.
    """

    outputs = ("logits", "modality_weights")
    #: the worker fetches this model's Beaver triples between requests (mpc.triples):
    #: a few MB per request; the vision models' triples (GBs at 224x224) stay on demand
    prefetch_triples = True

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
        self._folded: tuple[Any, Any] | None = None
        self._refusal: str | None = None

    def prepare(self) -> None:
        """Check the weights' bounds, then fold LayerNorm's affine map into the first head layer.

        Collective, once per model.

        Raises
        ------
        InferenceError
            ``model_out_of_range`` when a bound fails (:func:`ranges.shared_weight_violations`):
            this version's activations can leave the approximations' valid ranges, so it is
            refused for every request rather than answered wrongly.
        """
        if self._refusal is not None:
            raise InferenceError("model_out_of_range", self._refusal)
        if self._folded is not None:
            return
        with _untraced():  # once per model, like the fold
            violations = shared_weight_violations(self.p, self.n_mod)
        if violations:
            self._refusal = "this model version cannot be evaluated encrypted: " + "; ".join(violations)
            log.warning("refusing model for encrypted serving: %s", self._refusal)
            raise InferenceError("model_out_of_range", self._refusal)
        p = self.p
        w1 = p["head.1.weight"]  # (H, D)
        with _untraced():  # a once-per-model cost: not part of a request's prefetched triples
            w1g, shift = _mul_many([(w1, p["head.0.weight"].unsqueeze(0)), (w1, p["head.0.bias"].unsqueeze(0))])
        self._folded = (w1g, shift.sum(dim=1) + p["head.1.bias"])

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        self.prepare()
        p = self.p
        w1g, head_shift = self._folded
        feats, mask = inputs["features"], inputs["mask"]  # (B, M, D), (B, M)
        h = feats.matmul(p["fusion.proj.weight"].t()) + p["fusion.proj.bias"] + p["fusion.modality_embed"]
        scores = _tanh(h).matmul(p["fusion.score.weight"].t()).squeeze(-1)  # (B, M)
        # softmax is shift-invariant: centre on the mean score (linear, no rounds) instead of
        # the max (comparisons); |s| <= ||v||_1 because tanh is in [-1, 1]
        centred_scores = scores - scores.mean(dim=1, keepdim=True)
        expd = _exp(centred_scores) * mask
        total = expd.sum(dim=1, keepdim=True)  # (B, 1), > 0
        # CrypTen's initial guess for 1/total: 3 exp(0.5 - x) + 0.003, exp as (1 + x/256)^256;
        # its first squaring shares a round with the unnormalised fused features
        base = (0.5 - total).div(2 ** EXP_LIMIT_SQUARINGS).add(1)
        products, base = _mul_many([(expd.unsqueeze(-1), feats), (base, base)])
        unnormalised = products.sum(dim=1)  # (B, D) = sum_m exp(s_m) mask_m f_m
        for _ in range(EXP_LIMIT_SQUARINGS - 1):
            base = base.square()
        guess = base.mul(3).add(0.003)
        weights, fused = _goldschmidt_divide([expd, unnormalised], total, guess, RECIPROCAL_ITERS)
        centred = fused - fused.mean(dim=1, keepdim=True)
        squares, projected = _mul_many([(centred, centred), (centred.unsqueeze(1), w1g.unsqueeze(0))])
        var = squares.mean(dim=1, keepdim=True)
        inv_std = inv_sqrt(var + 1e-5, LN_SQRT_ITERS)
        hidden = (projected.sum(dim=-1) * inv_std + head_shift).relu()  # (B, H)
        logits = hidden.matmul(p["head.4.weight"].t()) + p["head.4.bias"]
        return {"logits": logits, "modality_weights": weights}


class EncryptedQuadraticHead:
    """The MPC-friendly fusion and head (``ModelConfig(fusion="quadratic")``) in 12 rounds.

    Plaintext (``protocols.model.QuadraticFusion`` and its head, eval mode):
    ``s_m = u_m . f_m``, ``q_m = mask_m (1 + s_m^2)``, ``Z = sum_m q_m``,
    ``x = sum_m q_m f_m / Z``, ``logits = W2 relu(W1 x + b1) + b2``.

    The parties never divide. ReLU is positively homogeneous, so for ``rho > 0``
    ``W2 relu(rho a) + rho b2 = rho logits`` with ``a = W1 x + b1``; with ``rho = r Z``,
    ``rho a = sum_m q_m r (W1 f_m + b1)`` needs only products. The parties return
    ``rho logits``, ``Q = r q`` and ``rho = sum_m Q_m``; the client divides
    (:func:`cloud_aggregator.inference.client.unscale_outputs`). ``r`` is a fresh random
    scale per query row, the sum of one private draw per party (each uniform on
    [1/4, 2]): no party knows it, it costs no communication, and the client learns the
    logits and the weights but the score scale ``Z`` only within a factor of 8.

    The client sends zero features for missing modalities (``client.prepare_inputs``), so
    their scores are exactly 0 and ``q = mask + s^2`` costs no product. A client that sends
    other features there changes only its own answer.

    ``relu`` and the last layer share a round: ``rho logits = sum_h W2[:, h] (rho a_h)
    [a_h >= 0] + rho b2``, and ``W2[:, h] rho a_h = sum_m q_m (r W2[:, h]) (W1 f_m + b1)_h``
    is computed beside ``rho a`` (its factors are ready by then), so after the secure sign
    only the product with the sign bits remains.

    Rounds: (1) ``u * f``, ``W1 * f``, ``r * W2``, ``r * b2``; (2) ``s^2``,
    ``r * (W1 f + b1)``, ``r W2 * (W1 f + b1)``; (3) the products with ``q``; (4-11) the
    sign of ``rho a`` (CrypTen's comparison: 7 AND rounds and a bit conversion); (12) the
    product with the sign bits.

    Fixed point: a product must stay below the 2^31 at which CrypTen's 16-bit fixed point
    wraps, and a 2-party truncation fails with probability ~|x| / 2^32; either error moves a
    value by a multiple of 2^32. The largest product, ``q_m r (W1 f_m + b1)``, reached ~3e5 for
    a model trained here to over-confidence (scores up to 47); large scores (``s^2`` passes
    2^31 for |s| > 46,341) make it wrap. Such an error shows at the client in the returned
    sums (``ranges.check_scaled``), except in ``rho a``, which only decides the ReLU's sign:
    the sign's comparison also compares ``|rho a|`` with ``SCALED_MAX`` (2^30), and the count
    of rows' violations is returned as ``range_violations``, secret-shared like the answer,
    so only the client learns it. A head with a square activation instead of ReLU (5 rounds)
    was tried and dropped: its ``(rho a)^2`` passed 2^31 on that model.
    """

    outputs = ("scaled_logits", "logit_scale", "scaled_weights", "range_violations")
    prefetch_triples = True
    #: each party's share of the scale ``r`` is uniform on this interval
    SCALE_DRAW = (0.25, 2.0)

    def __init__(self, config: dict, params: dict[str, Any]) -> None:
        from protocols.schema import MODALITIES

        self.dim = int(config.get("dim", 32))
        self.num_classes = int(config.get("num_classes", 3))
        self.n_mod = len(MODALITIES)
        self.inputs = (InputSpec("features", (self.n_mod, self.dim)), InputSpec("mask", (self.n_mod,)))
        need = ["fusion.score_weight", "head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias"]
        missing = [n for n in need if n not in params]
        if missing:
            raise InferenceError("model_mismatch", f"the shared model lacks {missing}")
        self.p = params

    def _random_scale(self, batch: int, device: Any) -> Any:
        """A shared ``r`` (batch, 1) > 0 that no party knows: each party's share is its own private draw."""
        crypten = load_crypten()
        low, high = self.SCALE_DRAW
        draw = low + (high - low) * torch.rand(batch, 1, generator=_local_generator(), dtype=torch.float64)
        return crypten.mpc.MPCTensor.from_shares(torch.round(draw * 2 ** 16).long().to(device))

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        p = self.p
        w1, b1, w2, b2 = p["head.0.weight"], p["head.0.bias"], p["head.3.weight"], p["head.3.bias"]
        feats, mask = inputs["features"], inputs["mask"]  # (B, M, D), zero where absent; (B, M)
        r = self._random_scale(int(feats.size(0)), feats.device)  # (B, 1)
        scored, projected, r_w2, r_b2 = _mul_many([
            (p["fusion.score_weight"].unsqueeze(0), feats),  # (B, M, D)
            (w1.unsqueeze(0).unsqueeze(0), feats.unsqueeze(2)),  # (B, M, H, D)
            (r.unsqueeze(-1), w2.unsqueeze(0)),  # (B, C, H)
            (r, b2.unsqueeze(0))])  # (B, C)
        scores = scored.sum(dim=-1)  # (B, M)
        hidden_in = projected.sum(dim=-1) + b1  # (B, M, H) = W1 f_m + b1
        squares, r_hidden, r_w2_hidden = _mul_many([
            (scores, scores), (r.unsqueeze(-1), hidden_in), (r_w2.unsqueeze(1), hidden_in.unsqueeze(2))])
        terms = squares + mask  # (B, M) = mask (1 + s^2)
        pre, scaled_terms, pre_out, bias_out = _mul_many([
            (terms.unsqueeze(-1), r_hidden),  # (B, M, H)
            (terms, r),  # (B, M)
            (terms.unsqueeze(-1).unsqueeze(-1), r_w2_hidden),  # (B, M, C, H)
            (terms.unsqueeze(-1), r_b2.unsqueeze(1))])  # (B, M, C)
        rho_a = pre.sum(dim=1)  # (B, H)
        # the ReLU's sign and, in the same comparison (no extra round), whether |rho a| <= SCALED_MAX
        negative, above, below = load_crypten().stack(
            [rho_a, SCALED_MAX - rho_a, rho_a + SCALED_MAX])._ltz().unbind(0)
        positive = 1 - negative  # (B, H): the sign of rho a, in {0, 1}
        out = pre_out.sum(dim=1)  # (B, C, H) = W2[c, h] rho a_h
        logits = (out * positive.unsqueeze(1).expand(*out.size())).sum(dim=-1) + bias_out.sum(dim=1)
        return {"scaled_logits": logits, "logit_scale": scaled_terms.sum(dim=1, keepdim=True),
                "scaled_weights": scaled_terms, "range_violations": (above + below).sum(dim=1, keepdim=True)}


def _local_generator() -> torch.Generator:
    """A torch generator seeded from the OS, private to this party (not CrypTen's shared seeds)."""
    import secrets

    return torch.Generator().manual_seed(secrets.randbits(63))


@contextlib.contextmanager
def _untraced():
    """Pause CrypTen's provider tracing (mpc.triples records a request's triples with it)."""
    provider = load_crypten().mpc.get_default_provider()
    tracing = getattr(provider, "tracing", False)
    if tracing:
        provider.trace(False)
    try:
        yield
    finally:
        if tracing:
            provider.trace(True)


def _mul_many(pairs: list[tuple[Any, Any]]) -> list[Any]:
    """The elementwise products ``x * y`` (broadcast) of several pairs, in one communication round.

    Independent multiplications each cost a round; concatenated into one flat tensor they
    cost one multiplication (one Beaver triple, one opening). The concatenation and the
    split are done on the parties' share tensors (local torch operations on this party's
    share are exact for additive shares), which avoids CrypTen's per-operation wrappers:
    a fifth of a small circuit's time. Shares that are not plain torch tensors of the
    default precision (CUDA shares are wrapped) take CrypTen's own operations.
    """
    crypten = load_crypten()
    shapes = [torch.broadcast_shapes(tuple(x.size()), tuple(y.size())) for x, y in pairs]
    bits = pairs[0][0]._tensor.encoder._precision_bits
    if all(type(t._tensor.share) is torch.Tensor and t._tensor.encoder._precision_bits == bits
           for pair in pairs for t in pair):
        mpc = crypten.mpc.MPCTensor
        x, y = (mpc.from_shares(torch.cat([pair[i]._tensor.share.expand(shape).reshape(-1)
                                            for pair, shape in zip(pairs, shapes)]), precision=bits)
                for i in (0, 1))
        flat = x.mul(y)._tensor.share
        out, start = [], 0
        for shape in shapes:
            size = math.prod(shape)
            out.append(mpc.from_shares(flat[start:start + size].reshape(shape), precision=bits))
            start += size
        return out
    product = crypten.cat([x.expand(*shape).flatten() for (x, _), shape in zip(pairs, shapes)]).mul(
        crypten.cat([y.expand(*shape).flatten() for (_, y), shape in zip(pairs, shapes)]))
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(product[start:start + size].reshape(*shape))
        start += size
    return out


def _goldschmidt_divide(numerators: list[Any], denominator: Any, guess: Any, iters: int) -> list[Any]:
    """Each ``numerator / denominator`` (denominator (B, 1), > 0; ``guess`` ~ 1/denominator).

    Goldschmidt: multiply numerators and denominator by ``guess``, then ``iters`` times by
    ``r = 2 - d``; ``d -> 1`` quadratically (the same sequence as Newton's reciprocal from
    the same guess), so the numerators -> the quotients. One round per iteration.
    """
    crypten = load_crypten()
    widths = [int(n.size(1)) for n in numerators]
    stack = crypten.cat([*numerators, denominator], dim=1) * guess
    for _ in range(iters):
        stack = stack * (2 - stack[:, -1:])
    out, start = [], 0
    for width in widths:
        out.append(stack[:, start:start + width])
        start += width
    return out


def _exp(x: Any, squarings: int = EXP_SQUARINGS) -> Any:
    """exp(x), accurate to ~1e-5 relative for |x| <= 2^k (16 at the default k = 4): a degree-7 Taylor polynomial of exp(x / 2^k) raised to 2^k.

    The powers are computed two at a time on stacked tensors (3 rounds), then k squarings.
    For negative x it stays near 0 down to x = -3.5 * 2^k; below that the Taylor polynomial
    grows and the result is wrong.
    """
    crypten = load_crypten()
    y = x.div(2 ** squarings)
    y2 = y.square()
    y3, y4 = crypten.stack([y, y2]).mul(crypten.stack([y2, y2])).unbind(0)
    y5, y6, y7 = crypten.stack([y4, y4, y4]).mul(crypten.stack([y, y2, y3])).unbind(0)
    out = 1 + y + y2.div(2) + y3.div(6) + y4.div(24) + y5.div(120) + y6.div(720) + y7.div(5040)
    for _ in range(squarings):
        out = out.square()
    return out


def _tanh_poly_coefficients(degree: int = TANH_DEGREE) -> list[float]:
    """Power-basis coefficients of the least-squares Chebyshev fit of (1 - t) / (1 + t) on [0, 1]."""
    t = np.cos(np.pi * (np.arange(400) + 0.5) / 400) / 2 + 0.5  # Chebyshev nodes on [0, 1]
    fit = np.polynomial.Chebyshev.fit(t, (1 - t) / (1 + t), degree, domain=[0, 1])
    return [float(c) for c in fit.convert(kind=np.polynomial.Polynomial, domain=[-1, 1], window=[-1, 1]).coef]


_TANH_COEFFS = _tanh_poly_coefficients()


def _tanh(x: Any) -> Any:
    """tanh(x): ``sign(x)`` for |x| > :data:`TANH_CLIP`, else a degree-7 polynomial in t = exp(-2|x|).

    Inside, tanh(|x|) = (1 - t) / (1 + t), the quotient fitted on [0, 1].

    Both branches of the polynomial are evaluated at once on the stacked ``[-2x, 2x]`` (no
    multiplication by the sign first): the branch whose exponent is <= 0 is the valid one.
    One batched secure comparison gives three bits, ``x < 0``, ``x > T`` and ``x < -T``, and
    one product with them selects the valid branch inside [-T, T] and the constant +-1
    outside. Branches that are not selected may hold any ring value (their exp is
    evaluated far outside its range); an exact product with a 0 bit (scale 1, no
    truncation) removes them. So the result is right for any input the fixed point holds
    (|x| < 2^31), not only where ``_exp`` is valid: the version before returned garbage
    beyond |x| = 56, which a DP-trained model's fusion reached (issue 11). 1 - tanh(T) =
    2.3e-7 at T = 8, below the 16-bit fixed point's 1.5e-5. 18 rounds: exp 6, powers 3,
    comparison 8, select 1; the comparison moves three times the bits of the old sign.
    """
    crypten = load_crypten()
    # exp(-2x) is valid for 0 <= x <= T, exp(2x) for -T <= x < 0
    t = _exp(crypten.stack([x.mul(-2), x.mul(2)]), TANH_EXP_SQUARINGS)
    t2 = t.square()
    t3, t4 = crypten.stack([t, t2]).mul(crypten.stack([t2, t2])).unbind(0)
    t5, t6, t7 = crypten.stack([t4, t4, t4]).mul(crypten.stack([t, t2, t3])).unbind(0)
    c = _TANH_COEFFS
    g = c[0] + t * c[1] + t2 * c[2] + t3 * c[3] + t4 * c[4] + t5 * c[5] + t6 * c[6] + t7 * c[7]
    g_pos, g_neg = g.unbind(0)  # tanh(|x|) from the x >= 0 branch, and from the x < 0 branch
    negative, above, below = crypten.stack([x, TANH_CLIP - x, x + TANH_CLIP])._ltz().unbind(0)
    # inside [-T, T]: g_pos - [x < 0] (g_pos + g_neg); above T: 1; below -T: -1
    keep, flip = (crypten.stack([1 - above - below, negative - below])
                  * crypten.stack([g_pos, g_pos + g_neg])).unbind(0)
    return keep - flip + above - below


def load_encrypted_model(meta: GlobalModelMeta, shares: dict[str, np.ndarray], device: str = "cpu") -> Any:
    """The encrypted model described by a global-model ``meta.json`` and this party's shares."""
    arch, config = meta.model.arch, dict(meta.model.config)
    denominator = meta.denominator
    if denominator < 1:
        raise InferenceError("bad_model", f"denominator must be >= 1, got {denominator}")
    if arch in VISION_ARCHS:
        keep = shares
    else:
        keep = {k: v for k, v in shares.items() if k.startswith(FUSION_PREFIXES)}
    params = {name: shares_to_mpc(arr, denominator, device) for name, arr in keep.items()}
    if arch in VISION_ARCHS:
        return EncryptedVisionModel(arch, config, params, device)
    if config.get("fusion", "attention") == "quadratic":
        return EncryptedQuadraticHead(config, params)
    return EncryptedFusionHead(config, params)
