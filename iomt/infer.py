"""`iomt infer`: the clinician's client for encrypted inference.

The case is either a patient in this hospital's edge store (``--data-dir``: the edge runs
the global model's modality encoders locally and only the fusion head runs encrypted; one
query row per signal window, whose probabilities are averaged, as the local ONNX predictor
does) or preprocessed model inputs in an ``.npz`` (``--input``: ``image`` for the image
models; ``features`` and ``mask`` for the fusion head). The inputs are secret-shared,
share i goes to party i, and only this client reconstructs the class probabilities and
modality weights. No party sees the inputs, the answer or the model.

Exit codes: 0 answered; 1 the cloud refused or failed; 2 bad arguments, a bad modality mask,
features that are not finite or beyond +-1024 (input_out_of_range), or no such patient/model;
3 no answer because the model's activations can leave the encrypted approximations' valid
ranges: the parties refused the model version (model_out_of_range) or the reconstructed
answer cannot be the model's (answer_out_of_range: logits not finite, modality weights
not in [0, 1] summing to 1, LayerNorm input out of range). Nothing is printed on stdout
then, so no class reaches the clinician.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from protocols.schema import CONDITIONS, MODALITIES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OUT_OF_RANGE = 0, 1, 2, 3
#: refusals because the encrypted approximations cannot answer this model or query correctly
OUT_OF_RANGE = frozenset({"model_out_of_range", "answer_out_of_range", "bad_answer"})


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    p = sub.add_parser(name, help=help_line, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patient", required=True, help="patient id (looked up locally, never sent)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", type=Path, help="this hospital's edge data dir (store + global model)")
    src.add_argument("--input", type=Path, help=".npz with the preprocessed model inputs of the case")
    p.add_argument("--parties", required=True, help="comma-separated party base URLs, in party-index order")
    p.add_argument("--key-file", required=True, help="this hospital's Ed25519 key file")
    p.add_argument("--model-version", type=int, help="global model version (default: the newest)")
    p.add_argument("--ca", "--tls-ca", dest="ca", help="the federation's CA certificate (verifies the parties)")
    p.add_argument("--tls-cert", help="this hospital's TLS certificate, presented to the parties (mutual TLS)")
    p.add_argument("--tls-key", help="its private key (made on this host by `iomt keys init`)")
    p.add_argument("--tls-crl", help="the federation CA's revocation list (crl.pem)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _inputs_from_store(data_dir: Path, patient: str) -> dict[str, np.ndarray]:
    from edge_server.dataset.records import load_records
    from edge_server.inference.query import fusion_query
    from edge_server.training import load_saved_model

    try:
        model_cfg, state = load_saved_model(data_dir / "models", name="global")
    except FileNotFoundError as err:
        raise LookupError(f"no global model in {data_dir / 'models'}: take part in a federated round first "
                          f"(`iomt edge federate`)") from err
    records = [r for r in load_records(data_dir) if r.patient_id == patient]
    if not records:
        raise LookupError(f"patient {patient!r} is not in {data_dir}")
    return fusion_query(model_cfg, state, records[0])


def to_result(patient: str, pred, average: bool) -> dict:
    """The answer as `iomt infer --json` prints it (window rows averaged when ``average``)."""
    probs = pred.probabilities
    weights = pred.outputs.get("modality_weights")
    if average:
        probs = probs.mean(axis=0, keepdims=True)
        weights = None if weights is None else weights.mean(axis=0, keepdims=True)
    labels = list(CONDITIONS) if probs.shape[1] == len(CONDITIONS) else [str(i) for i in range(probs.shape[1])]
    result = {"patient": patient, "request_id": pred.request_id, "model_version": pred.model_version,
              "probabilities": [dict(zip(labels, map(float, row))) for row in probs],
              "prediction": [labels[i] for i in probs.argmax(1)],
              "seconds": pred.seconds, "rounds": pred.rounds, "bytes": pred.bytes}
    if weights is not None:
        result["modality_weights"] = [dict(zip(MODALITIES, map(float, row.round(4)))) for row in weights]
    return result


def check_result(result: dict) -> None:
    """Refuse an answer that is not a probability distribution (``bad_answer``)."""
    from cloud_aggregator.inference.errors import InferenceError

    for row in result["probabilities"]:
        values = np.array(list(row.values()))
        if not (np.isfinite(values).all() and abs(values.sum() - 1.0) < 1e-3 and (values >= 0).all()):
            raise InferenceError("bad_answer", "the reconstructed probabilities are not a distribution")
    for row in result.get("modality_weights", []):
        values = np.array(list(row.values()))
        if not (np.isfinite(values).all() and abs(values.sum() - 1.0) < 1e-2 and (values >= -1e-3).all()):
            raise InferenceError("bad_answer", "the reconstructed modality weights do not sum to 1")


def client_tls(ca, cert=None, key=None, crl=None):
    """``predict``'s ``verify=``: the federation's CA and this hospital's own certificate
    (:class:`protocols.tls_client.ClientTls`), or True without a CA. The files are read once here, so
    a missing or mismatching one is a ``PkiError`` (or ``OSError``) before anything is sent."""
    from protocols.pki import PkiError
    from protocols.tls_client import ClientTls

    if ca is None:
        if cert is not None:
            raise PkiError("a TLS client certificate needs the federation's CA (--ca)")
        return True
    tls = ClientTls(*(Path(p) if p else None for p in (ca, cert, key, crl)))
    try:
        tls.context()
    except (OSError, ValueError) as err:
        raise PkiError(f"TLS files: {err}") from err
    return tls


def ask_cloud(data_dir: Path, patient: str, parties: list[str], signer, model_version: int | None = None,
              verify=True) -> dict:
    """Encrypted prediction for a patient of this edge's store, exactly as `iomt infer --data-dir` does.

    Raises ``InferenceError`` (``no_global_model`` / ``bad_input`` before anything is sent).
    """
    from cloud_aggregator.inference.client import predict, prepare_inputs
    from cloud_aggregator.inference.errors import InferenceError

    try:
        inputs = prepare_inputs(_inputs_from_store(data_dir, patient))
    except (LookupError, ValueError) as err:
        raise InferenceError("no_global_model" if "global model" in str(err) else "bad_input", str(err)) from err
    pred = predict(parties, signer, inputs, model_version=model_version, verify=verify)
    result = to_result(patient, pred, average=True)
    check_result(result)
    return result


def run(args: argparse.Namespace) -> int:
    from cloud_aggregator.inference.client import predict, prepare_inputs
    from cloud_aggregator.inference.errors import InferenceError
    from protocols.auth import Signer
    from protocols.pki import PkiError

    try:
        if args.data_dir is not None:
            inputs, average = _inputs_from_store(args.data_dir, args.patient), True
        else:
            with np.load(args.input) as z:
                inputs, average = {k: z[k] for k in z.files}, False
        inputs = prepare_inputs(inputs)  # a bad mask is refused here, before anything is sent
    except (LookupError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except InferenceError as err:
        print(f"error: {err.reason}: {err.detail}", file=sys.stderr)
        return EXIT_USAGE
    try:
        pred = predict(args.parties.split(","), Signer.from_file(args.key_file), inputs,
                       model_version=args.model_version, verify=client_tls(args.ca, args.tls_cert, args.tls_key,
                                                                            args.tls_crl))
    except PkiError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except InferenceError as err:
        if err.reason in OUT_OF_RANGE:
            print(f"error: {err.reason}: no answer, since it could be wrong: {err.detail}", file=sys.stderr)
            return EXIT_OUT_OF_RANGE
        print(f"error: {err.reason}: {err.detail}", file=sys.stderr)
        return EXIT_FAILED
    result = to_result(args.patient, pred, average)
    try:
        check_result(result)
    except InferenceError as err:
        print(f"error: {err.reason}: no answer, since it could be wrong: {err.detail}", file=sys.stderr)
        return EXIT_OUT_OF_RANGE
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    for i, row in enumerate(result["probabilities"]):
        print(f"{args.patient}[{i}]: {result['prediction'][i]}  " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()))
    for row in result.get("modality_weights", []):
        print("modality weights: " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()))
    return EXIT_OK
