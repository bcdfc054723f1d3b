"""The client's checks of a query and of a reconstructed answer against the encrypted approximations' ranges."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cloud_aggregator.inference.client import prepare_inputs, unscale_outputs
from cloud_aggregator.inference.errors import InferenceError
from cloud_aggregator.inference.ranges import (EXP_MAX_ARG, SOFTMAX_TOTAL_MAX, check_answer, check_features,
                                                score_norm_limit)


def _query(scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"features": scale * rng.standard_normal((2, 4, 8)), "mask": np.array([[1.0, 1, 1, 0], [1, 1, 1, 1]])}


def _answer(weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    w = np.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]) if weights is None else weights
    return {"logits": np.array([[0.1, 2.0, -1.0], [0.0, 0.3, 0.2]]), "modality_weights": w}


def test_a_plausible_answer_passes():
    check_answer(_query(), _answer(), layernorm=True)


@pytest.mark.parametrize("bad", [
    {"logits": np.array([[np.nan, 0, 0], [0, 0, 0]])},
    {"logits": np.array([[3e9, 0, 0], [0, 0, 0]])},  # a wrapped fixed-point value
    {"modality_weights": np.array([[2.6e9, 1.2e9, -2.8e9, 0], [0.25, 0.25, 0.25, 0.25]])},  # issue 11's answer
    {"modality_weights": np.array([[0.6, 0.3, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])},  # sums to 1.2
    {"modality_weights": np.array([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])},  # weight on a missing modality
])
def test_answers_that_cannot_be_the_models_are_refused(bad):
    with pytest.raises(InferenceError) as err:
        check_answer(_query(), {**_answer(), **bad}, layernorm=True)
    assert err.value.reason == "answer_out_of_range"


def test_layernorm_input_outside_its_encrypted_range_is_refused():
    with pytest.raises(InferenceError, match="LayerNorm") as err:  # fused variance ~ 3e2 > 200
        check_answer(_query(30.0), _answer(), layernorm=True)
    assert err.value.reason == "answer_out_of_range"
    with pytest.raises(InferenceError, match="LayerNorm"):  # ~ 4e-5 < 2e-4
        check_answer(_query(0.01), _answer(), layernorm=True)
    check_answer(_query(30.0), _answer(), layernorm=False)  # the quadratic head has no LayerNorm


def test_queries_beyond_the_fixed_point_range_never_leave_the_client():
    with pytest.raises(InferenceError) as err:
        prepare_inputs(_query(1e4))
    assert err.value.reason == "input_out_of_range"
    bad = _query()
    bad["features"][0, 0, 0] = np.inf
    with pytest.raises(InferenceError, match="infinite"):
        check_features(bad)


def test_quadratic_heads_wrapped_answers_are_refused():
    raw = {"scaled_logits": np.ones((1, 3)), "logit_scale": np.full((1, 1), 2.0), "scaled_weights": np.ones((1, 4)) / 2}
    assert unscale_outputs({**raw, "range_violations": np.zeros((1, 1))})["logits"].shape == (1, 3)
    for bad in ({"range_violations": np.ones((1, 1))}, {"scaled_logits": np.full((1, 3), 2.0 ** 32)}):
        with pytest.raises(InferenceError) as err:
            unscale_outputs({**raw, **bad})
        assert err.value.reason == "answer_out_of_range"


def test_score_norm_limit_keeps_the_softmax_in_range():
    limit = score_norm_limit(4)
    assert 4.1 < limit < 4.2
    # the worst case at the limit: one score at +S, three at -S, centred on the mean
    c = np.array([limit, -limit, -limit, -limit]) - (-limit / 2)
    assert np.abs(c).max() <= EXP_MAX_ARG and np.exp(c).sum() <= SOFTMAX_TOTAL_MAX * (1 + 1e-6)
    assert math.isclose(np.exp(c).sum(), SOFTMAX_TOTAL_MAX, rel_tol=1e-3)
