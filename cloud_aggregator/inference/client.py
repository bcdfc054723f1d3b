"""The clinician's side: secret-share a query, send share i to party i, reconstruct the answer.

Inputs are encoded in CrypTen's 16-bit fixed point (protocols.fixedpoint) and split into
additive shares in Z_2^64 (protocols.sharing); each party receives only its own share. The
answer comes back as one share per party; only the client sums them. Class probabilities
are computed here, in the clear, from the reconstructed logits.
"""
from __future__ import annotations

import ssl
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np

from cloud_aggregator.inference.errors import InferenceError
from cloud_aggregator.inference.messages import InferenceRequest, InferenceResponse, TensorShare
from cloud_aggregator.inference.publish import split_shares
from cloud_aggregator.inference.ranges import check_answer, check_features, check_scaled
from protocols.aggregation_messages import ErrorBody
from protocols.auth import Signer
from protocols.tls_client import ClientTls, pin_extensions
from protocols.fixedpoint import decode, encode
from protocols.sharing import reconstruct

TIMEOUT_S = 180.0

_clients: dict[bool | str | ClientTls, httpx.Client] = {}
_clients_lock = threading.Lock()


def _http_client(verify: bool | str | ClientTls) -> httpx.Client:
    """One pooled HTTP client per TLS setting, kept for the process.

    Building an ``httpx.Client`` loads a CA bundle into a new SSL context: about 50 ms here,
    for plain http too. A client per request (two, one per party) made a 40 ms quadratic-head
    request take 125 ms at the clinician; a kept client also keeps its connections open.
    """
    with _clients_lock:
        client = _clients.get(verify)
        if client is None:  # a CA bundle path becomes an SSL context (httpx deprecates verify=<path>)
            context = (verify.context() if isinstance(verify, ClientTls) else
                       ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify)
            client = _clients[verify] = httpx.Client(verify=context)
        return client


@dataclass(frozen=True)
class Prediction:
    request_id: str
    model_version: int
    outputs: dict[str, np.ndarray]  # reconstructed, float64
    seconds: float  # slowest party's compute time
    rounds: int
    bytes: int

    @property
    def probabilities(self) -> np.ndarray:
        z = self.outputs["logits"] - self.outputs["logits"].max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def unscale_outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Logits and modality weights from a quadratic fusion head's scaled answer (others unchanged).

    That head (``cloud_aggregator.inference.models.EncryptedQuadraticHead``) does not divide
    under MPC: it returns ``scale * logits``, the ``scale`` and the weights' numerators times
    a random factor. The divisions happen here, in the clear, on the client's own answer,
    after :func:`ranges.check_scaled` (``answer_out_of_range`` on a fixed-point error).
    """
    if "logit_scale" not in outputs:
        return outputs
    check_scaled(outputs)
    scale, numerators = outputs["logit_scale"], outputs["scaled_weights"]
    total = numerators.sum(axis=1, keepdims=True)
    if not (np.all(scale > 0) and np.all(total > 0)):
        raise InferenceError("bad_answer", "the parties' scale is not positive: was a modality present?")
    return {"logits": outputs["scaled_logits"] / scale, "modality_weights": numerators / total}


def prepare_inputs(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check a fusion-head query's mask and zero the features of missing modalities.

    The parties cannot check the mask (they see only shares): it must be 0/1 (the encrypted
    heads multiply or add it where the plaintext model thresholds it) with at least one
    modality per row. Features of a missing modality never reach the answer in the
    plaintext model; sending zeros there is what lets the quadratic head skip a product
    (``EncryptedQuadraticHead``). Inputs without a mask (image models) pass unchanged.
    Every input must be finite and within ``ranges.FEATURE_MAX`` (``input_out_of_range``).
    """
    check_features(inputs)
    mask, feats = inputs.get("mask"), inputs.get("features")
    if mask is None:
        return inputs
    mask = np.asarray(mask)
    if mask.ndim != 2:
        return inputs  # the parties refuse wrong shapes (bad_shape)
    if not np.isin(mask, (0.0, 1.0)).all():
        raise InferenceError("bad_input", "mask entries must be 0 (modality missing) or 1 (present)")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise InferenceError("bad_input", f"query rows {empty.tolist()[:5]} have no modality present")
    if feats is None or np.ndim(feats) != 3 or np.shape(feats)[:2] != mask.shape:
        return inputs
    return {**inputs, "features": np.where(mask[..., None] > 0, feats, 0.0)}


def share_inputs(inputs: dict[str, np.ndarray], parties: int) -> list[dict[str, TensorShare]]:
    """Per party, its share of every (float) input."""
    per_party: list[dict[str, TensorShare]] = [{} for _ in range(parties)]
    for name, value in inputs.items():
        for i, part in enumerate(split_shares(encode(np.asarray(value, dtype=np.float64)), parties)):
            per_party[i][name] = TensorShare.from_array(part)
    return per_party


def predict(party_urls: list[str], signer: Signer, inputs: dict[str, np.ndarray], model_version: int | None = None,
            timeout: float = TIMEOUT_S, verify: bool | str | ClientTls = True) -> Prediction:
    """Encrypted inference: ``inputs`` never leave this process except as shares.

    ``verify``: a :class:`protocols.tls_client.ClientTls` (the federation's CA and this client's own
    certificate, which the parties require), a CA bundle path, or True (system CAs).

    Raises
    ------
    InferenceError
        with ``code`` ``input_out_of_range`` / ``bad_input`` (the query, before anything is
        sent), a party's refusal (e.g. ``model_out_of_range``, ``bad_shape``,
        ``party_unreachable``), or ``answer_out_of_range`` when the reconstructed answer
        cannot be the model's (:func:`ranges.check_answer`): never a wrong answer silently.
    """
    inputs = prepare_inputs(inputs)
    rid = uuid.uuid4().hex
    shares = share_inputs(inputs, len(party_urls))

    def call(i: int) -> InferenceResponse:
        body = InferenceRequest(request_id=rid, model_version=model_version, inputs=shares[i])
        try:
            resp = _http_client(verify).post(
                f"{party_urls[i].rstrip('/')}/inference/v1/predict", content=body.model_dump_json(),
                headers={**signer.headers(f"party-{i}"), "content-type": "application/json"}, timeout=timeout,
                extensions=pin_extensions(party_urls[i], f"party-{i}"))  # only party i's certificate there
        except httpx.HTTPError as err:
            raise InferenceError("party_unreachable", f"party {i} at {party_urls[i]}: {err}") from err
        if resp.status_code != 200:
            try:  # the parties' ErrorBody
                err = ErrorBody.model_validate_json(resp.content)
                code, msg = err.error, err.detail
            except ValueError:
                code, msg = "refused", resp.text[:200]
            raise InferenceError(code, f"party {i} answered {resp.status_code}: {msg}")
        return InferenceResponse.model_validate_json(resp.content)

    with ThreadPoolExecutor(len(party_urls)) as pool:
        futures = [pool.submit(call, i) for i in range(len(party_urls))]
        answers = [f.result() for f in futures]
    versions = {a.model_version for a in answers}
    if len(versions) != 1 or any(set(a.outputs) != set(answers[0].outputs) for a in answers):
        raise InferenceError("inconsistent_parties", "parties answered for different models")
    raw = {name: decode(reconstruct([a.outputs[name].to_array() for a in answers])) for name in answers[0].outputs}
    outputs = unscale_outputs(raw)
    # only the attention head (weights not scaled) has a LayerNorm, whose input range the client checks
    check_answer(inputs, outputs, layernorm="modality_weights" in raw)
    return Prediction(rid, versions.pop(), outputs, max(a.seconds for a in answers),
                      max(a.rounds for a in answers), sum(a.bytes for a in answers))
