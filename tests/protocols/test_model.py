"""The multimodal model: every modality subset, fusion weights, state dicts, config, tokenizer."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from protocols.model import ModelConfig, build_model, example_inputs, load_numpy_state, state_to_numpy
from protocols.schema import MODALITIES
from protocols.text import CLS_ID, PAD_ID, HashingTokenizer

torch.set_num_threads(1)

SUBSETS = [s for r in range(1, 5) for s in itertools.combinations(range(4), r)]


def _random_inputs(cfg: ModelConfig, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image, ehr, signals, tokens, mask = example_inputs(cfg, batch)
    image = torch.randn(image.shape, generator=g)
    ehr = torch.randn(ehr.shape, generator=g)
    ehr[0, :3] = float("nan")  # unmeasured EHR features
    signals = torch.randn(signals.shape, generator=g)
    tokens[:, 1:9] = torch.randint(2, cfg.text_vocab, (batch, 8), generator=g)
    return [image, ehr, signals, tokens, mask]


#: the paper's attention fusion and the MPC-friendly quadratic fusion
FUSIONS = [{}, {"fusion": "quadratic"}]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_all_fifteen_modality_subsets_run_and_weights_are_a_distribution_over_present_ones(fusion):
    # Prepare: one batch row per non-empty subset of the four modalities.
    assert len(SUBSETS) == 15
    torch.manual_seed(0)
    cfg = ModelConfig(**fusion)
    model = build_model(cfg).eval()
    inputs = _random_inputs(cfg, len(SUBSETS))
    mask = torch.zeros(len(SUBSETS), 4)
    for row, subset in enumerate(SUBSETS):
        mask[row, list(subset)] = 1.0
    # Execute
    with torch.no_grad():
        logits, weights = model(*inputs[:4], mask)
    # Assert
    assert logits.shape == (15, cfg.num_classes) and torch.isfinite(logits).all()
    assert weights.shape == (15, len(MODALITIES))
    torch.testing.assert_close(weights.sum(1), torch.ones(15))
    assert (weights[mask == 0] == 0).all()
    assert (weights[mask == 1] > 0).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_missing_modality_inputs_do_not_influence_the_prediction(fusion):
    torch.manual_seed(0)
    cfg = ModelConfig(**fusion)
    model = build_model(cfg).eval()
    inputs = _random_inputs(cfg, 3)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 3)
    changed = [t.clone() for t in inputs]
    changed[1] = torch.randn_like(changed[1]) * 5  # EHR is masked out
    changed[3][:, 1:20] = 7                        # so is text
    with torch.no_grad():
        a = model(*inputs[:4], mask)
        b = model(*changed[:4], mask)
        # the image is present: it matters (a new image, not a rescaled one: the CNN's
        # GroupNorm makes it blind to the scale of an image, which preprocessing fixes anyway)
        c = model(*[torch.randn_like(inputs[0]), *inputs[1:4]], mask)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert not torch.allclose(a[0], c[0])


def test_fusion_weights_are_learned_parameters_that_receive_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_model(cfg)
    logits, _ = model(*_random_inputs(cfg, 4))
    logits.sum().backward()
    assert model.fusion.score.weight.grad is not None
    assert model.fusion.score.weight.grad.abs().sum() > 0
    quadratic = build_model(ModelConfig(fusion="quadratic"))
    logits, weights = quadratic(*_random_inputs(quadratic.cfg, 4))
    (logits.sum() + weights[:, 0].sum()).backward()
    assert quadratic.fusion.score_weight.grad.abs().sum() > 0


def test_quadratic_fusion_weights_follow_their_formula():
    """w_m = mask_m (1 + s_m^2) / sum_k mask_k (1 + s_k^2), s_m = u_m . f_m; the head has no LayerNorm."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=8, fusion="quadratic")).eval()
    feats, mask = torch.randn(5, 4, 8), torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1],
                                                      [1, 0, 1, 0]])
    fused, weights = model.fusion(feats, mask)
    scores = torch.einsum("bmd,md->bm", feats, model.fusion.score_weight)
    terms = mask * (1 + scores ** 2)
    torch.testing.assert_close(weights, terms / terms.sum(1, keepdim=True))
    torch.testing.assert_close(fused, torch.einsum("bm,bmd->bd", weights, feats))
    assert weights[1, 0] == 1.0 and weights[3, 3] == 1.0  # a lone modality takes all the weight
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.head)


@pytest.mark.parametrize("encoder", ["resnet18", "alexnet"])
def test_optional_image_encoders_build_run_and_export_only_float_state(encoder):
    torch.manual_seed(0)
    cfg = ModelConfig(image_encoder=encoder)
    model = build_model(cfg)
    logits, weights = model(*_random_inputs(cfg, 2))
    assert logits.shape == (2, cfg.num_classes)
    state = state_to_numpy(model)
    assert all(v.dtype == np.float32 for v in state.values())
    assert not any(k.endswith("num_batches_tracked") for k in state)
    if encoder == "resnet18":
        assert any(k.endswith("running_mean") for k in state)  # BN statistics travel as floats


def test_state_round_trip_is_exact_and_stable():
    torch.manual_seed(1)
    cfg = ModelConfig()
    a = build_model(cfg)
    state = state_to_numpy(a)
    assert list(state) == list(state_to_numpy(build_model(cfg)))  # stable names and order
    assert all(v.dtype == np.float32 for v in state.values())
    b = load_numpy_state(build_model(cfg), state)
    for name, t in b.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), state[name])


def test_loading_a_mismatched_state_fails_clearly():
    cfg = ModelConfig()
    state = state_to_numpy(build_model(cfg))
    bad_shape = dict(state, **{"head.4.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match="head.4.bias"):
        load_numpy_state(build_model(cfg), bad_shape)
    missing = {k: v for k, v in state.items() if k != "head.4.bias"}
    with pytest.raises(ValueError, match="missing"):
        load_numpy_state(build_model(cfg), missing)


def test_model_config_json_round_trip_and_typos_are_rejected():
    cfg = ModelConfig(dim=16, image_encoder="alexnet")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError):
        ModelConfig(dimm=16)


def test_tokenizer_is_deterministic_bounded_and_order_aware():
    tok = HashingTokenizer(vocab_size=512, max_len=16)
    a = tok.encode("Chest pain, radiating to the LEFT arm.")
    assert a.dtype == np.int64 and a.shape == (16,)
    assert a[0] == CLS_ID and (a[1:] >= 2).sum() > 0 and a.max() < 512
    np.testing.assert_array_equal(a, HashingTokenizer(vocab_size=512, max_len=16).encode("chest pain radiating to the left arm"))
    assert not np.array_equal(tok.encode("no chest pain"), tok.encode("chest pain no"))
    empty = tok.encode(None)
    assert empty[0] == CLS_ID and (empty[1:] == PAD_ID).all()
    long = tok.encode(" ".join(["word"] * 100))
    assert (long != PAD_ID).all()  # truncated to max_len, never overflowing
    assert tok.encode_batch(["a", None]).shape == (2, 16)
