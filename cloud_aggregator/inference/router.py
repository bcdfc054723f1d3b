"""FastAPI router for encrypted inference, included in every party's app.

``POST /inference/v1/predict`` takes this party's share of a query (hospital tokens
only; audience ``party-<i>``), hands it to the party's CrypTen worker and returns this
party's share of the answer. ``GET /inference/v1/status`` reports whether the MPC group is
up. Refusals answer the services' shared ErrorBody (``{"error": code, "detail": message}``)
with the HTTP status of :class:`cloud_aggregator.mpc.jobs.JobStatus`. The MPC group is the
party's (``cloud_aggregator.party.build_mpc_group``), which starts and stops it.
"""
from __future__ import annotations

import collections
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute

from cloud_aggregator.inference.audit import AuditLog
from cloud_aggregator.inference.errors import InferenceError
from cloud_aggregator.inference.messages import InferenceRequest, InferenceResponse, TensorShare
from cloud_aggregator.metrics import PartyMetrics
from cloud_aggregator.mpc.jobs import Job, http_status
from cloud_aggregator.mpc.worker import WorkerSupervisor
from cloud_aggregator.web import Refused, responses
from protocols.auth import AuthError, Registry

log = logging.getLogger(__name__)

def build_router(settings: Any, group: WorkerSupervisor | None,
                 route_class: type[APIRoute] = APIRoute, metrics: PartyMetrics | None = None) -> APIRouter:
    """The inference router of party ``settings.index``, computing in the party's MPC ``group``
    (None: the party was started without ``--mpc-master`` and refuses with ``not_configured``).

    ``route_class`` is the party's (it bounds request bodies, see cloud_aggregator.web);
    ``metrics`` its Prometheus metrics (a registry of the router's own without).
    """
    metrics = metrics or PartyMetrics(settings.parties)
    router = APIRouter(prefix="/inference/v1", tags=["encrypted inference"], route_class=route_class)
    registry = Registry(settings.registry, max_ttl=settings.max_token_ttl)
    audience = f"party-{settings.index}"
    audit = AuditLog(Path(settings.data_dir) / "audit" / "inference.jsonl")
    counters: collections.Counter = collections.Counter()

    def _refuse(client: str, rid: str, version: int | None, code: str, message: str, status: int) -> Refused:
        counters[f"rejected_{code}"] += 1
        metrics.inference_errors.labels(reason=code).inc()
        audit.record(client, rid, version, code, None)
        log.warning("party %d refused inference %s from %s: %s", settings.index, rid, client, message)
        return Refused(status, code, message, noted=True)

    @router.post("/predict", response_model=InferenceResponse,
                 responses=responses(400, 401, 403, 404, 409, 413, 422, 503, 504))
    def predict(body: InferenceRequest, request: Request) -> InferenceResponse:
        """Compute on this party's share of the query; returns this party's share of the answer."""
        started = time.perf_counter()
        metrics.inference_requests.inc()
        try:
            client = registry.verify_header(request.headers.get("authorization"), audience, ("hospital",)).sub
        except AuthError as err:
            counters[f"auth_rejected_{err.status}"] += 1
            metrics.tokens_refused.labels(reason=err.reason).inc()
            metrics.inference_errors.labels(reason=err.http_error).inc()
            log.warning("party %d refused inference: %s", settings.index, err)
            raise Refused(err.status, err.http_error, str(err),
                          noted=True) from err
        if group is None:  # not a passing outage (503) but how this party was set up
            raise _refuse(client, body.request_id, body.model_version, "not_configured",
                          "this party serves no encrypted inference (started without --mpc-master)", 404)
        try:
            inputs = {name: share.to_array() for name, share in body.inputs.items()}
            shares, info = group.submit(Job(body.request_id, client, body.model_version, inputs))
        except InferenceError as err:
            raise _refuse(client, body.request_id, body.model_version, err.reason, err.detail,
                          http_status(err.reason)) from err
        counters["served"] += 1
        metrics.inference_seconds.observe(time.perf_counter() - started)
        batch = next(iter(inputs.values())).shape[0]
        audit.record(client, body.request_id, info["version"], "ok", batch)
        log.info("party %d answered inference %s from %s: version %s, batch %d, %.3f s, %d rounds", settings.index,
                 body.request_id, client, info["version"], batch, info["seconds"], info["rounds"])
        return InferenceResponse(request_id=body.request_id, party=settings.index, model_version=info["version"],
                                 outputs={k: TensorShare.from_array(v) for k, v in shares.items()},
                                 seconds=info["seconds"], rounds=info["rounds"], bytes=info["bytes"])

    @router.get("/status")
    def status() -> dict:
        """Whether this party's MPC worker has joined its group, restarts, and request counters."""
        return {"party": settings.index, "configured": group is not None,
                "ready": bool(group and group.ready),
                "restarts": group.restarts if group else 0, "counters": dict(counters)}

    return router
