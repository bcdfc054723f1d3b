"""`iomt edge predict`: class probabilities and modality weights for one patient, with ONNX Runtime.

Exit codes: 0 predicted; 2 no such model or patient, the patient's data is unusable, or the
model needs the optional MiniLM text encoder and it is not installed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from protocols.model import INPUT_NAMES
from protocols.schema import MODALITIES, PatientRecord

EXIT_OK, EXIT_NOT_FOUND = 0, 2
#: Models tried, in order, when ``--model`` is not given (relative to the data dir).
DEFAULT_MODELS = ("models/global.onnx", "models/local.onnx")


class OnnxPredictor:
    """An exported model in an ONNX Runtime session, fed from :class:`PatientRecord` lists."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        from edge_server.inference.onnx_export import read_metadata

        self.path = Path(path)
        self.model_cfg, self.classes = read_metadata(self.path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def run(self, image, ehr, signals, tokens, mask) -> tuple[np.ndarray, np.ndarray]:
        """Raw graph outputs (logits, modality weights) for numpy inputs.

        ``tokens`` is the ``(B, MINILM_DIM)`` float32 note embedding for a minilm model.
        """
        feeds = dict(zip(INPUT_NAMES, (image, ehr, signals, tokens, mask)))
        logits, weights = self.session.run(None, feeds)
        return logits, weights

    def predict(self, records: list[PatientRecord]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Patient ids kept, class probabilities and modality weights, averaged over signal windows.

        Unusable records are skipped (and logged) by :func:`records_to_tensors`.
        """
        from edge_server.training.data import records_to_tensors

        data = records_to_tensors(records, self.model_cfg, need_label=False)
        n, k = len(data), self.model_cfg.num_classes
        probs, weights = np.zeros((n, k)), np.zeros((n, len(MODALITIES)))
        for w in range(data.windows.shape[1]):
            rows = np.flatnonzero(data.n_windows.numpy() > w)
            if len(rows) == 0:
                continue
            inputs = [t.numpy() for t in data.inputs(_t(rows), _t(np.full(len(rows), w)))]
            logits, wts = self.run(*inputs)
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs[rows] += z / z.sum(axis=1, keepdims=True)
            weights[rows] += wts
        count = data.n_windows.numpy().astype(np.float64)[:, None]
        return data.patient_ids, probs / count, weights / count


def _t(arr: np.ndarray):
    import torch
    return torch.from_numpy(np.asarray(arr, dtype=np.int64))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path, help="the edge's data directory (its store)")
    parser.add_argument("--patient", required=True, help="patient id")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"ONNX model (default: the first of {', '.join(DEFAULT_MODELS)} in DATA_DIR)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


class NotPredictable(LookupError):
    """No model, no such patient, or data the model cannot use."""


def predict_patient(data_dir: Path, patient: str, model: Path | None = None) -> dict:
    """The ONNX prediction `iomt edge predict --json` prints, for ``patient`` in ``data_dir``.

    Raises :class:`NotPredictable` with the reason when there is no model or patient, or
    the patient's data cannot be used.
    """
    data_dir = Path(data_dir)
    if model is None:
        model = next((data_dir / p for p in DEFAULT_MODELS if (data_dir / p).exists()), None)
    if model is None or not Path(model).exists():
        raise NotPredictable(f"no model at {model or data_dir / DEFAULT_MODELS[0]}; run `iomt edge train` "
                             "or a federated round first, or pass --model")
    if not data_dir.is_dir():
        raise NotPredictable(f"data directory {data_dir} does not exist")
    from edge_server.dataset.records import load_records

    records = [r for r in load_records(data_dir) if r.patient_id == patient]
    if not records:
        raise NotPredictable(f"patient {patient!r} is not in {data_dir}")
    try:
        predictor = OnnxPredictor(model)
    except (ValueError, OSError) as err:
        raise NotPredictable(f"cannot load model {model}: {err}") from err
    if predictor.model_cfg.text_encoder == "minilm":
        from edge_server.dataset.text_embedding import CACHE_DIR, TextEmbeddingUnavailable, attach_note_embeddings
        try:
            attach_note_embeddings(records[:1], cache_dir=data_dir / CACHE_DIR)
        except TextEmbeddingUnavailable as err:
            raise NotPredictable(str(err)) from err
    ids, probs, weights = predictor.predict(records[:1])
    if not ids:
        raise NotPredictable(f"the data of patient {patient!r} cannot be used by the model (see log)")
    rec = records[0]
    info_path = Path(model).with_suffix(".json")
    info = json.loads(info_path.read_text()).get("info", {}) if info_path.exists() else {}
    return {
        "patient": patient,
        "model": str(model),
        "model_version": info.get("version"),
        "probabilities": {c: float(p) for c, p in zip(predictor.classes, probs[0])},
        "predicted": predictor.classes[int(probs[0].argmax())],
        "modality_weights": {m: float(w) for m, w in zip(MODALITIES, weights[0])},
        "modalities_present": list(rec.modalities()),
        "label": None if rec.label is None else predictor.classes[int(rec.label)],
    }


def run(args: argparse.Namespace) -> int:
    try:
        result = predict_patient(args.data_dir, args.patient, args.model)
    except NotPredictable as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NOT_FOUND
    model = result["model"]
    if args.json:
        print(json.dumps(result, indent=1))
        return EXIT_OK
    print(f"patient {args.patient} (model {model})")
    print("  probabilities: " + "  ".join(f"{c} {p:.3f}" for c, p in result["probabilities"].items()))
    print(f"  predicted: {result['predicted']}" + (f" (recorded: {result['label']})" if result["label"] else ""))
    print("  modality weights: " + "  ".join(f"{m} {w:.3f}" for m, w in result["modality_weights"].items()))
    return EXIT_OK
