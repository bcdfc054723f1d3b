"""`iomt infer`: the clinician's client for encrypted inference.

The model inputs of one case (as the edge preprocessed them) are read from an ``.npz``
file (``image`` for the image models; ``features`` and ``mask`` for the multimodal fusion
head), secret-shared, sent share i to party i, and the reconstructed class probabilities
and modality weights are printed. No party sees the inputs or the answer.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from protocols.schema import CONDITIONS


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    p = sub.add_parser(name, help=help_line, description=__doc__)
    p.add_argument("--patient", required=True, help="patient id (recorded locally, never sent)")
    p.add_argument("--input", required=True, help=".npz with the preprocessed model inputs of the case")
    p.add_argument("--parties", required=True, help="comma-separated party base URLs, in party-index order")
    p.add_argument("--key-file", required=True, help="this hospital's Ed25519 key file")
    p.add_argument("--model-version", type=int, help="global model version (default: the newest)")
    p.add_argument("--ca", help="CA bundle to verify the parties' TLS certificates")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cloud_aggregator.inference.client import predict
    from cloud_aggregator.inference.errors import InferenceError
    from protocols.auth import Signer

    with np.load(args.input) as z:
        inputs = {k: z[k] for k in z.files}
    try:
        pred = predict(args.parties.split(","), Signer.from_file(args.key_file), inputs,
                       model_version=args.model_version, verify=args.ca or True)
    except InferenceError as err:
        print(f"error: {err.code}: {err.message}", file=sys.stderr)
        return 1
    probs = pred.probabilities
    labels = list(CONDITIONS) if probs.shape[1] == len(CONDITIONS) else [str(i) for i in range(probs.shape[1])]
    result = {"patient": args.patient, "request_id": pred.request_id, "model_version": pred.model_version,
              "probabilities": [dict(zip(labels, map(float, row))) for row in probs],
              "prediction": [labels[i] for i in probs.argmax(1)]}
    if "modality_weights" in pred.outputs:
        result["modality_weights"] = pred.outputs["modality_weights"].round(4).tolist()
    if args.json:
        print(json.dumps(result))
    else:
        for i, row in enumerate(result["probabilities"]):
            print(f"{args.patient}[{i}]: {result['prediction'][i]}  " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()))
        if "modality_weights" in result:
            print("modality weights:", result["modality_weights"])
    return 0
