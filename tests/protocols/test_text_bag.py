"""The default text encoder reads whole notes: bucket counts of every word and word pair,
a weighted mean of their embeddings, exact per-patient gradients and an ONNX graph."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_server.training import records_to_tensors
from protocols.model import INPUT_NAMES, ModelConfig, build_model, state_to_numpy
from protocols.schema import PatientRecord
from protocols.text import NgramBag, note_pieces

torch.set_num_threads(1)

HEAD = " ".join(["the heart size is normal and the lungs are clear without focal consolidation"] * 5)
#: Two notes that share their first 70 words and differ only in the last sentence.
NOTES = (f"{HEAD} there is a large right pleural effusion",
         f"{HEAD} there is no pleural effusion or pneumothorax")


def _note_only(pid: str, note: str) -> PatientRecord:
    return PatientRecord(patient_id=pid, hospital="h", label=0, note=note)


def test_bag_counts_every_word_and_pair_of_the_whole_note():
    bag = NgramBag(vocab_size=512)
    text = "No chest pain. Chest pain, radiating to the LEFT arm."
    counts = bag.encode(text)
    pieces = note_pieces(text)
    assert counts.dtype == np.float32 and counts.shape == (512,)
    assert counts.sum() == len(pieces) == 19  # 10 words, 9 pairs
    assert counts[bag.bucket("chest")] >= 2 and counts[bag.bucket("chest pain")] >= 2  # repeats count
    np.testing.assert_array_equal(counts, NgramBag(vocab_size=512).encode(text.lower()))
    long = bag.encode(" ".join(["word"] * 1000))
    assert long[bag.bucket("word")] == 1000 and long.sum() == 1999  # never truncated
    assert not bag.encode(None).any() and not bag.encode("").any()
    assert bag.encode_batch(["a", None]).shape == (2, 512) and bag.encode_batch([]).shape == (0, 512)


def test_a_note_longer_than_the_old_48_token_limit_is_read_to_its_tail():
    # Prepare: the default model and the edge's own featurisation of two notes that differ
    # only after their first 70 words (140 words and pairs; the old encoder kept 47)
    cfg = ModelConfig()
    assert len(NOTES[0].split()) > 48
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    data = records_to_tensors([_note_only("a", NOTES[0]), _note_only("b", NOTES[1])], cfg)
    idx = torch.arange(2)
    # Execute
    with torch.no_grad():
        logits, _ = model(*data.inputs(idx, torch.zeros_like(idx)))
    # Assert: the tail reaches the model's input and changes its output
    assert not torch.equal(data.tokens[0], data.tokens[1])
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_bag_weights_repeats_sublinearly_and_ignores_a_missing_note():
    torch.manual_seed(0)
    enc = build_model(ModelConfig(text_vocab=64, dim=8)).text_encoder
    once, twice = torch.zeros(1, 64), torch.zeros(1, 64)
    once[0, [3, 5]] = 1.0
    twice[0, 3], twice[0, 5] = 2.0, 1.0
    w = enc.embed.weight.detach()
    expected = (np.log(3) * w[:, 3] + np.log(2) * w[:, 5]) / (np.log(3) + np.log(2))
    with torch.no_grad():
        assert torch.allclose(enc(twice), enc.norm(expected.unsqueeze(0)), atol=1e-5)
        assert not torch.allclose(enc(twice), enc(once))
        assert torch.isfinite(enc(torch.zeros(2, 64))).all()  # no note: no NaN (its mask is 0)


def test_per_patient_gradients_of_the_bag_equal_a_loop_even_with_repeated_words():
    from edge_server.training.dpsgd import make_private_trainable, per_example_grads
    # Prepare: text-only patients whose notes repeat words and pairs many times (the case
    # Opacus' EmbeddingBag grad sampler gets wrong) and a small vocabulary so that buckets collide
    cfg = ModelConfig(dim=8, ehr_hidden=8, lstm_hidden=8, cnn_channels=(2, 4, 4), text_vocab=32, signal_pool=25,
                      dropout=0.0)
    notes = ["effusion effusion effusion effusion right effusion", "clear clear lungs clear lungs clear",
             NOTES[0], "normal"]
    data = records_to_tensors([_note_only(f"p{i}", n) for i, n in enumerate(notes)], cfg)
    data.labels = torch.tensor([1, 0, 2, 0])
    assert data.tokens.max() >= 4  # repeated buckets within a row
    torch.manual_seed(0)
    model = make_private_trainable(build_model(cfg)).eval()
    idx = torch.arange(len(notes))
    inputs = data.inputs(idx, torch.zeros_like(idx))
    # Execute
    grads, _ = per_example_grads(model, inputs, data.labels)
    # Assert: each patient's gradient is a backward pass on that patient alone, for the
    # embedding table and every other parameter
    assert grads["text_encoder.embed.weight"].abs().sum() > 0
    for i in range(len(notes)):
        model.zero_grad()
        logits, _ = model(*(t[i:i + 1] for t in inputs))
        torch.nn.functional.cross_entropy(logits, data.labels[i:i + 1]).backward()
        for name, p in model.named_parameters():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            assert torch.allclose(grads[name][i], expected, atol=1e-6), name


def test_bag_model_exports_to_onnx_and_matches_pytorch_on_long_notes(tmp_path):
    from edge_server.inference.onnx_export import export_onnx
    cfg = ModelConfig()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = export_onnx(cfg, state_to_numpy(model), tmp_path / "bag.onnx")
    data = records_to_tensors([_note_only("a", NOTES[0]), _note_only("b", NOTES[1])], cfg)
    idx = torch.arange(2)
    inputs = data.inputs(idx, torch.zeros_like(idx))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens_in = next(i for i in session.get_inputs() if i.name == "tokens")
    assert tokens_in.type == "tensor(float)" and tokens_in.shape[1] == cfg.text_vocab
    with torch.no_grad():
        logits, weights = model(*inputs)
    onnx_logits, onnx_weights = session.run(None, dict(zip(INPUT_NAMES, (t.numpy() for t in inputs))))
    np.testing.assert_allclose(onnx_logits, logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(onnx_weights, weights.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(onnx_logits[0] - onnx_logits[1]).max() > 1e-4


@pytest.mark.parametrize("encoder", ["bag", "transformer"])
def test_state_names_of_everything_but_the_text_encoder_do_not_depend_on_it(encoder):
    names = {k for k in state_to_numpy(build_model(ModelConfig(text_encoder=encoder))) if not k.startswith("text_encoder.")}
    assert names == {k for k in state_to_numpy(build_model(ModelConfig(text_encoder="minilm")))
                     if not k.startswith("text_encoder.")}
