"""Valid ranges of the encrypted heads' approximations, and the checks that keep an answer inside them.

The attention head (``models.EncryptedFusionHead``) evaluates exp, a reciprocal and
LayerNorm's 1/sqrt with polynomials and iterations that are right only on bounded inputs;
outside, CrypTen returns finite but wrong numbers, and a clinician must never get those
as an answer (issue 11: a DP-trained model's tanh input reached 7,500 and ``iomt infer``
printed a wrong class). Three checks, each refusing with a stable code:

* **Model** (parties, once per loaded version, on shares): bounds from the weights
  (:func:`shared_weight_violations`). Only one bit per check is opened: whether the bound
  holds. Refused: ``model_out_of_range``.
* **Query** (client, before sending): features finite and within :data:`FEATURE_MAX`
  (:func:`check_features`). Refused: ``input_out_of_range``.
* **Answer** (client, after reconstructing): finite logits within :data:`LOGIT_MAX`,
  modality weights in [0, 1] summing to 1 and 0 for absent modalities, and for the
  attention head the fused features' variance inside LayerNorm's range, recomputed from
  the weights and the client's own features (:func:`check_answer`). Refused:
  ``answer_out_of_range``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from cloud_aggregator.inference.errors import InferenceError

#: exp is accurate for |x| <= 16 (models.EXP_SQUARINGS = 4)
EXP_MAX_ARG = 16.0
#: below exp(-7) ~ 9e-4 (60 steps of 2^-16) a softmax numerator has too few bits
EXP_MIN_ARG = -7.0
#: the softmax denominator's reciprocal (CrypTen's initial guess, then Goldschmidt) converges up to ~500
SOFTMAX_TOTAL_MAX = 500.0
#: LayerNorm's 1/sqrt(var + 1e-5) (mpc.functions.inv_sqrt, 12 iterations), measured in 2-party fixed
#: point: 1e-3 relative from var 0.01 to 200, 6e-3 at 1e-3, 5 % at 2e-4 (the variance itself
#: has few bits: 10 % at 1e-4); from 204.8 on CrypTen's initial guess (... + 0.2 - var / 1024)
#: is negative and the result garbage
LN_VAR_RANGE = (2e-4, 200.0)
#: BatchNorm's running variance + eps, folded with CrypTen's 1/sqrt (16 Newton steps, the same
#: initial guess): measured 4e-3 relative at 1e-3, 2e-4 up to 204, garbage from 204.8
BN_VAR_RANGE = (1e-3, 200.0)
#: the client recomputes the fused variance from the weights (error ~1e-3): judge with this margin
LN_VAR_MARGIN = 1.1
#: largest |feature| a query may carry: keeps every product of features and weights far
#: below the 2^31 at which 16-bit fixed point wraps (a product has 32 fractional bits in Z_2^64)
FEATURE_MAX = 1024.0
#: largest |W f + b + e| the fusion projection may produce from features within FEATURE_MAX;
#: the truncation of a 2-party product fails with probability ~|x| 2^16 / 2^63 (2^-23 here)
PRE_ACTIVATION_MAX = 2.0 ** 24
#: a logit beyond this is a wrapped fixed-point value, not a model's answer
LOGIT_MAX = 2.0 ** 20
#: a scaled sum of the quadratic head beyond this is a fixed-point error (errors are multiples of 2^32)
SCALED_MAX = 2.0 ** 30
#: tolerance of the weights' checks (the encrypted weights are accurate to ~1e-3)
WEIGHT_TOL = 1e-2


def score_norm_limit(n_mod: int) -> float:
    """Largest ``||v||_1`` of the attention score vector for which the softmax stays in range.

    ``|s_m| <= ||v||_1 = S`` since tanh is in [-1, 1]; the head centres the scores on their
    mean over all ``n_mod`` modalities, so ``|c_m| <= 2 S (n_mod - 1) / n_mod``, and the
    denominator ``sum_m exp(c_m)`` (convex in s, so largest at a vertex of the box: k
    scores at +S, the rest at -S) is at most
    ``max_k k exp(2S (n - k) / n) + (n - k) exp(-2S k / n)``. Bisection for the largest S
    with the exponents in [EXP_MIN_ARG, EXP_MAX_ARG] and that denominator <= SOFTMAX_TOTAL_MAX.
    """
    n = n_mod

    def ok(s: float) -> bool:
        spread = 2 * s * (n - 1) / n
        total = max(k * math.exp(2 * s * (n - k) / n) + (n - k) * math.exp(-2 * s * k / n) for k in range(1, n + 1))
        return spread <= EXP_MAX_ARG and -spread >= EXP_MIN_ARG and total <= SOFTMAX_TOTAL_MAX

    lo, hi = 0.0, EXP_MAX_ARG
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def shared_weight_violations(params: dict[str, Any], n_mod: int) -> list[str]:
    """The attention head's weight bounds that do not hold, computed on shares (collective).

    Opens one bit per bound (whether it holds), nothing else about the weights:

    * ``softmax``: ``||v||_1 <= score_norm_limit(n_mod)`` (exp and the reciprocal, above);
    * ``tanh input``: per row of the projection, ``||W_j||_1 FEATURE_MAX + |b_j| +
      sum_m |e_mj| <= PRE_ACTIVATION_MAX``; tanh itself is valid for any such input
      (``models._tanh`` clips to +-1 beyond |x| = 8).

    LayerNorm's variance depends on the query, not only on the weights: the client checks
    it on each answer (:func:`check_answer`).
    """
    from cloud_aggregator.crypten_compat import load_crypten

    crypten = load_crypten()
    v, w = params["fusion.score.weight"].flatten(), params["fusion.proj.weight"]  # (D,), (D, D)
    b, e = params["fusion.proj.bias"], params["fusion.modality_embed"]  # (D,), (M, D)
    dim = int(b.size(0))
    absolute = crypten.cat([v, w.flatten(), b, e.flatten()]).abs()  # one batched comparison
    abs_v, abs_w = absolute[:dim], absolute[dim:dim + dim * dim].reshape(dim, dim)
    abs_b, abs_e = absolute[dim + dim * dim:dim * (dim + 2)], absolute[dim * (dim + 2):].reshape(-1, dim)
    row_bound = abs_w.sum(dim=1) + (abs_b + abs_e.sum(dim=0)).div(FEATURE_MAX)  # (D,), times FEATURE_MAX
    margins = crypten.cat([(score_norm_limit(n_mod) - abs_v.sum()).reshape(1),
                           PRE_ACTIVATION_MAX / FEATURE_MAX - row_bound])
    bad = margins._ltz()  # 1 where a bound fails
    # open whether any row fails, not which: one more comparison on the count
    flags = crypten.cat([bad[:1], (0.5 - bad[1:].sum()).reshape(1)._ltz()]).get_plain_text()
    names = (f"softmax: score vector ||v||_1 > {score_norm_limit(n_mod):.2f}",
             f"tanh input: fusion projection could exceed {PRE_ACTIVATION_MAX:.0e} for features within {FEATURE_MAX:g}")
    return [name for name, flag in zip(names, flags.tolist()) if flag > 0.5]


def shared_any_outside(x: Any, low: float, high: float) -> bool:
    """Whether any entry of the shared ``x`` is outside [low, high] (collective; opens only this bit)."""
    from cloud_aggregator.crypten_compat import load_crypten

    crypten = load_crypten()
    flat = x.flatten()
    count = crypten.cat([high - flat, flat - low])._ltz().sum()
    return bool((0.5 - count.reshape(1))._ltz().get_plain_text().item() > 0.5)


def check_features(inputs: dict[str, np.ndarray]) -> None:
    """Refuse (``input_out_of_range``) a query whose features are not finite or exceed FEATURE_MAX."""
    for name, value in inputs.items():
        arr = np.asarray(value, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise InferenceError("input_out_of_range", f"input {name!r} has NaN or infinite entries")
        if arr.size and np.abs(arr).max() > FEATURE_MAX:
            raise InferenceError("input_out_of_range", f"input {name!r} has entries beyond +-{FEATURE_MAX:g} "
                                 f"(max |x| = {np.abs(arr).max():.3g}): 16-bit fixed-point products would wrap")


def check_scaled(outputs: dict[str, np.ndarray]) -> None:
    """Refuse (``answer_out_of_range``) a quadratic head's raw answer with a fixed-point error.

    A wrapped product or a failed truncation moves a value by a multiple of 2^32; every
    returned sum of a valid answer is below :data:`SCALED_MAX`, and the parties count the
    rows whose ReLU input ``rho a`` was not (``range_violations``, see
    ``models.EncryptedQuadraticHead``).
    """
    raw = [outputs[k] for k in ("scaled_logits", "logit_scale", "scaled_weights") if k in outputs]
    if any(not np.isfinite(v).all() or np.abs(v).max(initial=0.0) > SCALED_MAX for v in raw):
        raise InferenceError("answer_out_of_range", "the quadratic head's scaled answer left the fixed-point "
                             "range (a score or product wrapped): the activations are too large for this model")
    violations = outputs.get("range_violations")
    if violations is not None and np.asarray(violations).max(initial=0.0) > 0.5:
        rows = np.flatnonzero(np.asarray(violations).reshape(-1) > 0.5).tolist()
        raise InferenceError("answer_out_of_range", f"rows {rows[:5]}: the quadratic head's ReLU input left the "
                             "fixed-point range (a score or product wrapped)")


def check_answer(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], layernorm: bool) -> None:
    """Refuse (``answer_out_of_range``) a reconstructed answer that cannot be the model's.

    ``layernorm``: the answer is the attention head's, whose LayerNorm input is the fused
    features ``sum_m w_m f_m``; their variance must lie in :data:`LN_VAR_RANGE`.
    """
    logits = outputs.get("logits")
    if logits is not None:
        if not np.isfinite(logits).all() or np.abs(logits).max(initial=0.0) > LOGIT_MAX:
            raise InferenceError("answer_out_of_range", f"logits not finite or beyond +-{LOGIT_MAX:g}: the model's "
                                 "activations left the encrypted approximations' valid ranges")
    weights = outputs.get("modality_weights")
    if weights is None:
        return
    sums = weights.sum(axis=1)
    if not np.isfinite(weights).all() or weights.min(initial=0.0) < -WEIGHT_TOL \
            or weights.max(initial=0.0) > 1 + WEIGHT_TOL or np.abs(sums - 1).max(initial=0.0) > WEIGHT_TOL:
        raise InferenceError("answer_out_of_range", "modality weights are not in [0, 1] summing to 1 "
                             f"(sums {np.round(sums[:4], 4).tolist()}): the model's activations left the "
                             "encrypted approximations' valid ranges")
    mask, feats = inputs.get("mask"), inputs.get("features")
    if mask is not None and np.abs(weights[np.asarray(mask) < 0.5]).max(initial=0.0) > WEIGHT_TOL:
        raise InferenceError("answer_out_of_range", "a missing modality got weight in the encrypted answer")
    if layernorm and feats is not None:
        fused = np.einsum("bm,bmd->bd", np.clip(weights, 0, 1), np.asarray(feats, dtype=np.float64))
        var = fused.var(axis=1)
        low, high = LN_VAR_RANGE
        if var.max(initial=0.0) > high / LN_VAR_MARGIN or var.min(initial=high) < low * LN_VAR_MARGIN:
            raise InferenceError("answer_out_of_range", f"the fused features' variance ({var.min():.3g}.."
                                 f"{var.max():.3g}) is outside LayerNorm's encrypted range {low:g}..{high:g}")
