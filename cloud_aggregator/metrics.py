"""Prometheus metrics of a party and of the coordinator, and the plain-HTTP listener that serves them.

Each service instance owns one :class:`~prometheus_client.CollectorRegistry` (never the
process-global default), so tests can run several parties in one process. The listener is a
separate port (``metrics_host:metrics_port``, off by default) for the management network:
Prometheus scrapes it without a token, so it carries counts, durations and states only:
no token, key, share, model parameter, patient or request id. The only labels are bounded
code-defined slugs (``reason``, ``outcome``, ``trigger``, ``state``, ``call``) and party
indices; hospitals are counted, never named.

Counters restart from zero with the process (as Prometheus expects); the authenticated JSON
``/metrics`` route of each service keeps its own counters for the operator's page and tests.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from fastapi import Request

log = logging.getLogger(__name__)

#: Seconds for aggregating one round (a FedAvg sum: well under a second; FedAdam in MPC: minutes).
AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: Seconds for one encrypted-inference request (a toy model: tens of ms; AlexNet on CPUs: minutes).
INFERENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
#: Seconds from a round's opening to its global model (bounded by the round timeout plus aggregation).
ROUND_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
#: States of the coordinator's current round (protocols.aggregation_messages.RoundState), and none yet.
ROUND_STATES = ["none", "open", "closing", "aggregating", "done", "failed"]


def _route(request: Request) -> tuple[str, str]:
    """The matched route's template (``/rounds/{rnd}/share``, not the path) and the method."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched"), request.method


class PartyMetrics:
    """The metrics of one party (``iomt_party_*``)."""

    def __init__(self, parties: int) -> None:
        self.registry = r = CollectorRegistry()
        self.uploads = Counter("iomt_party_uploads", "Share uploads answered 200: stored new, or a resend "
                               "of bytes already held", ["outcome"], registry=r)
        self.upload_bytes = Counter("iomt_party_upload_bytes", "Bytes of share uploads stored", registry=r)
        self.uploads_refused = Counter("iomt_party_uploads_refused", "Share uploads refused, by reason "
                                       "(tokens: iomt_party_tokens_refused)", ["reason"], registry=r)
        self.refused = Counter("iomt_party_requests_refused", "Requests refused with an error body, by reason "
                               "(every route; tokens: iomt_party_tokens_refused)", ["reason"], registry=r)
        self.tokens_refused = Counter("iomt_party_tokens_refused", "Bearer tokens refused, by reason",
                                      ["reason"], registry=r)
        self.rounds_aggregated = Counter("iomt_party_rounds_aggregated", "Rounds aggregated into a new global "
                                         "model share", registry=r)
        self.aggregation_failed = Counter("iomt_party_aggregations_failed", "Aggregation requests refused or "
                                          "failed, by reason", ["reason"], registry=r)
        self.aggregation_seconds = Histogram("iomt_party_aggregation_seconds", "Time to aggregate one round",
                                             buckets=AGGREGATION_BUCKETS, registry=r)
        self.global_downloads = Counter("iomt_party_global_downloads", "Global model shares sent to hospitals",
                                        registry=r)
        self.inference_requests = Counter("iomt_party_inference_requests", "Encrypted-inference requests "
                                          "received (answered or refused)", registry=r)
        self.inference_errors = Counter("iomt_party_inference_errors", "Encrypted-inference requests refused "
                                        "or failed, by reason", ["reason"], registry=r)
        self.inference_seconds = Histogram("iomt_party_inference_seconds", "Time to answer one encrypted-"
                                           "inference request (answered ones)", buckets=INFERENCE_BUCKETS,
                                           registry=r)
        Gauge("iomt_party_parties", "Parties n of the sharing (and of the MPC group)", registry=r).set(parties)
        self.mpc_configured = Gauge("iomt_party_mpc_configured", "1 if this party runs an MPC worker "
                                    "(started with mpc_master)", registry=r)
        self.mpc_ready = Gauge("iomt_party_mpc_ready", "1 while this party's MPC worker has joined its group",
                               registry=r)
        self.mpc_restarts = Gauge("iomt_party_mpc_restarts", "Restarts of this party's MPC worker since start",
                                  registry=r)

    def watch_mpc(self, group: Any | None) -> None:
        """Read the MPC group's state (``ready``, ``restarts``) at scrape time."""
        self.mpc_configured.set(0 if group is None else 1)
        if group is not None:
            self.mpc_ready.set_function(lambda: 1.0 if group.ready else 0.0)
            self.mpc_restarts.set_function(lambda: float(group.restarts))

    def on_refusal(self, request: Request, status: int, reason: str) -> None:
        """Count one refusal answered by the party's error handlers (cloud_aggregator.web)."""
        self.refused.labels(reason=reason).inc()
        path, method = _route(request)
        if method == "PUT" and path == "/rounds/{rnd}/share":
            self.uploads_refused.labels(reason=reason).inc()
        elif path == "/rounds/{rnd}/aggregate":
            self.aggregation_failed.labels(reason=reason).inc()
        elif path.startswith("/inference/v1/predict"):  # refused before the handler ran (body, validation)
            self.inference_requests.inc()
            self.inference_errors.labels(reason=reason).inc()


class CoordinatorMetrics:
    """The metrics of the coordinator (``iomt_coordinator_*``)."""

    def __init__(self, parties: int) -> None:
        self.registry = r = CollectorRegistry()
        self.rounds_opened = Counter("iomt_coordinator_rounds_opened", "Rounds opened", registry=r)
        self.rounds_closed = Counter("iomt_coordinator_rounds_closed", "Rounds closed to uploads, by trigger "
                                     "(all_in: every expected hospital uploaded; deadline)", ["trigger"], registry=r)
        self.rounds_done = Counter("iomt_coordinator_rounds_done", "Rounds whose global model every party "
                                   "published", registry=r)
        self.rounds_failed = Counter("iomt_coordinator_rounds_failed", "Rounds failed, by reason", ["reason"],
                                     registry=r)
        self.round = Gauge("iomt_coordinator_round", "Number of the current (newest) round, 0 before the first",
                           registry=r)
        self.round_state = Enum("iomt_coordinator_round_state", "State of the current round", states=ROUND_STATES,
                                registry=r)
        self.round_seconds = Histogram("iomt_coordinator_round_seconds", "Time from a round's opening to its "
                                       "global model", buckets=ROUND_BUCKETS, registry=r)
        self.aggregation_seconds = Histogram("iomt_coordinator_aggregation_seconds", "Time from a round's "
                                             "participant set to every party's global share",
                                             buckets=AGGREGATION_BUCKETS, registry=r)
        self.participants = Gauge("iomt_coordinator_round_participants", "Hospitals aggregated in the last "
                                  "round that fixed its participants", registry=r)
        self.excluded = Counter("iomt_coordinator_hospitals_excluded", "Uploads left out of a round, by reason",
                                ["reason"], registry=r)
        self.hospitals = Gauge("iomt_coordinator_hospitals_registered", "Hospitals registered in the federation",
                               registry=r)
        Gauge("iomt_coordinator_parties", "Parties configured (party_urls)", registry=r).set(parties)
        self.parties_answering = Gauge("iomt_coordinator_parties_answering", "Parties that answered the last "
                                       "receipts poll (polled while a round is open or closing)", registry=r)
        self.party_errors = Counter("iomt_coordinator_party_errors", "Calls to a party that failed (a retry "
                                    "follows), by party index and call", ["party", "call"], registry=r)
        self.privacy_reports = Counter("iomt_coordinator_privacy_reports", "Privacy-spent reports received from "
                                       "hospitals", registry=r)
        self.refused = Counter("iomt_coordinator_requests_refused", "Requests refused with an error body, by "
                               "reason (tokens: iomt_coordinator_tokens_refused)", ["reason"], registry=r)
        self.tokens_refused = Counter("iomt_coordinator_tokens_refused", "Bearer tokens refused, by reason "
                                      "(the operator's page included)", ["reason"], registry=r)

    def on_refusal(self, request: Request, status: int, reason: str) -> None:
        self.refused.labels(reason=reason).inc()


def serve_metrics(registry: CollectorRegistry, settings: Any, service: str) -> bool:
    """Serve ``registry`` in Prometheus text format on plain HTTP ``settings.metrics_host:metrics_port``
    from a daemon thread (nothing when the port is None; 0 picks a free one). False, logged at
    ERROR, when the address cannot be bound (a settings error: the caller exits 2)."""
    if settings.metrics_port is None:
        return True
    try:
        server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    except OSError as err:
        log.error("%s cannot serve metrics on %s:%d: %s", service, settings.metrics_host, settings.metrics_port, err)
        return False
    log.info("%s metrics on http://%s:%d/metrics", service, settings.metrics_host, server.server_port)
    return True
