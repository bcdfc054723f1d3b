"""`iomt edge ...`: each action lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; `iomt.cli` imports it only when used."""
from __future__ import annotations

ACTIONS: dict[str, tuple[str, str]] = {
    "run": ("edge_server.ingest.daemon", "subscribe to the hospital broker, validate, preprocess and store"),
    "status": ("edge_server.ingest.status", "what the edge has stored and rejected"),
    "train": ("edge_server.training.cli", "train the multimodal model on this edge's store"),
    "predict": ("edge_server.inference.onnx_predict", "predict for one patient with the global model (ONNX Runtime)"),
    "federate": ("edge_server.federation.client", "take part in federated rounds with the cloud parties"),
    # composed in iomt: "Ask the cloud" uses the cloud's inference client, as `iomt infer` does
    "web": ("iomt.edge_web", "the clinician's page: sign-in, patients, encrypted prediction"),
    "users": ("edge_server.web.accounts", "manage the clinician page's staff accounts"),
}

