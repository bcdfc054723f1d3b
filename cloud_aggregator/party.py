"""`iomt cloud party`: one non-colluding party of the secure aggregation.

It receives from each hospital only its own share (party 0: the full share; party j>0: a
32-byte seed it expands), stores it durably before acknowledging, and when the
coordinator fixes a round's participant set sums exactly those shares into its share of
the new global model, which it keeps (see :mod:`cloud_aggregator.store`).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import time
from typing import Annotated

import httpx
from fastapi import FastAPI, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from cloud_aggregator.accumulator import RoundAccumulator
from cloud_aggregator.metrics import PartyMetrics, serve_metrics
from cloud_aggregator.mpc import JobKind, WorkerConfig, WorkerSupervisor
from cloud_aggregator.mpc.mpclink import add_mpc_link_arguments, resolve_link
from cloud_aggregator.readiness import Readiness
from cloud_aggregator.serve import add_tls_arguments, listen_flags, serve, tls_flags, transport_error
from cloud_aggregator.settings import PartySettings
from cloud_aggregator.store import PartyStore, StoreError, check_id, file_sha256, latest_version
from cloud_aggregator.strategies import get_strategy
from cloud_aggregator.web import bounded_route, error_response, install_error_handlers, read_body, refuse, responses
from protocols.aggregation_messages import (MAX_SAMPLES_DEFAULT, AggregateRequest, AggregateResult, Receipt,
                                            Receipts, RoundConfig, RoundStatus, UploadAck, upload_from_wire)
from protocols.auth import AuthError, Registry, Signer
from protocols.tls_client import pin_extensions
from protocols.config import add_config_argument, load_settings
from protocols.errors import ConfigError, Refusal, ShareError
from protocols.model_files import GlobalModelMeta
from protocols.params import normalise_spec, spec_size, unflatten

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG = 0, 2
#: A round number in a path: 1 .. 10^9.
RoundNo = Annotated[int, Path(ge=1, le=10**9)]
#: A global model version in a path: ``latest`` or 1 .. 10^9 in plain digits.
VersionRef = Annotated[str, Path(pattern=r"^(latest|[1-9][0-9]{0,8})$")]


class RoundRefused(Refusal):
    """A request about a round that this party will not serve: an upload for a stale, closed or
    unknown round, an aggregation it cannot do as asked, a model version it does not hold."""


#: HTTP status of each refusal reason of this party (others: 409 Conflict).
_REFUSAL_STATUS = {"coordinator_unreachable": 503, "bad_id": 400, "no_model": 404}


class Party:
    """The state behind one party's HTTP API (store, registry, counters)."""

    def __init__(self, settings: PartySettings, mpc: WorkerSupervisor | None = None) -> None:
        self.settings = settings
        self.store = PartyStore(settings.data_dir)
        self.sums = RoundAccumulator()
        #: the MPC group: encrypted inference and the server optimiser (None without --mpc-master)
        self.mpc = mpc
        self.registry = Registry(settings.registry, max_ttl=settings.max_token_ttl)
        self.signer = Signer.from_file(settings.key_file) if settings.key_file else None
        self.counters: collections.Counter[str] = collections.Counter()
        #: the Prometheus metrics (served on metrics_host:metrics_port by ``run``)
        self.metrics = PartyMetrics(settings.parties)
        self.metrics.watch_mpc(mpc)
        self.lock = asyncio.Lock()
        self.audience = settings.principal

    def auth(self, request: Request, roles: tuple[str, ...]) -> str:
        try:
            return self.registry.verify_header(request.headers.get("authorization"), self.audience, roles).sub
        except AuthError as err:
            self.counters[f"auth_rejected_{err.status}"] += 1
            self.metrics.tokens_refused.labels(reason=err.reason).inc()
            log.warning("party %d refused %s %s: %s", self.settings.index, request.method,
                        request.url.path, err)
            raise

    # round configs come from the coordinator and are cached durably ---------------------
    def round_config(self, rnd: int) -> RoundConfig:
        cfg = self.store.load_config(rnd)
        if cfg is not None:
            return cfg
        if not (self.settings.coordinator_url and self.signer):
            raise RoundRefused("unknown_round", f"round {rnd} unknown and no coordinator configured")
        try:
            url = self.settings.coordinator_url
            with httpx.Client(verify=self.settings.client_tls(), timeout=10.0) as client:
                resp = client.get(f"{url}/rounds/{rnd}", headers=self.signer.headers("coordinator"),
                                  extensions=pin_extensions(url, "coordinator"))
        except httpx.HTTPError as err:
            raise RoundRefused("coordinator_unreachable", f"cannot fetch round {rnd}: {err}") from err
        if resp.status_code == 404:
            raise RoundRefused("unknown_round", f"the coordinator has no round {rnd}")
        resp.raise_for_status()
        status = RoundStatus.model_validate_json(resp.content)
        if status.state != "open":
            raise RoundRefused("round_closed", f"round {rnd} is {status.state}")
        self.store.save_config(status.config)
        return status.config

    def accept(self, hospital: str, rnd: int, raw: bytes) -> tuple[Receipt, bool]:
        """Validate and durably store one upload; returns its receipt and whether it is new.

        Idempotent: the very bytes already stored for (round, hospital) get the same receipt
        again (a retry whose acknowledgement was lost, even after the round closed); different
        bytes are refused (``replay``, 409).
        """
        upload = upload_from_wire(raw)
        h = upload.header
        if h.hospital != hospital:
            raise AuthError("wrong_hospital", f"token is for {hospital!r} but the upload says {h.hospital!r}", 403)
        check_id(h.hospital)
        if h.round != rnd:
            raise ShareError("wrong_round", f"upload says round {h.round}, URL says {rnd}")
        if h.party_index != self.settings.index or h.parties != self.settings.parties:
            raise ShareError("wrong_party", f"share for party {h.party_index}/{h.parties}, "
                             f"this is party {self.settings.index}/{self.settings.parties}")
        held = self.store.held(rnd, hospital, raw)
        if held is not None:
            return held, False
        cfg = self.round_config(rnd)
        cap = self.sample_cap(hospital, cfg)
        if h.n_samples > cap:
            raise ShareError("too_many_samples", f"{hospital} claims {h.n_samples} samples, at most {cap} "
                             "per round are accepted")
        if self.store.global_dir(cfg.version).exists():
            raise RoundRefused("round_closed", f"round {rnd} is already aggregated")
        if time.time() > cfg.deadline:
            raise RoundRefused("round_closed", f"round {rnd}'s deadline has passed")
        spec = normalise_spec(cfg.spec)
        if h.spec_hash != cfg.spec_hash or h.size != spec_size(spec):
            raise ShareError("wrong_shape", f"update has {h.size} parameters / spec {h.spec_hash[:12]}, "
                             f"round {rnd} expects {spec_size(spec)} / {cfg.spec_hash[:12]}")
        receipt = self.store.save_upload(upload, raw)  # durable (fsync) before anything else
        try:  # off the round-close path: the share joins the running sum now
            self.sums.add(rnd, upload)
        except (ValueError, MemoryError) as err:  # the close-time fix-up re-adds it from disk
            log.warning("party %d: could not accumulate %s's share now: %s", self.settings.index, hospital, err)
        return receipt, True

    def sample_cap(self, hospital: str, cfg: RoundConfig) -> int:
        """The most samples ``hospital`` may claim in ``cfg``'s round: this party's cap, the
        coordinator's, and the registry's declaration for the hospital, whichever is least."""
        caps = [self.settings.max_samples, cfg.max_samples, self.registry.max_samples(hospital)]
        return min(c for c in caps if c is not None)

    def aggregate(self, req: AggregateRequest) -> AggregateResult:
        cfg = req.config
        rnd = cfg.round
        announced = self.store.load_config(rnd)
        if announced is None:
            self.store.save_config(cfg)
        # the minimum the hospitals were shown (the config this party fetched for their uploads)
        least = max(cfg.min_participants, announced.min_participants if announced else 1)
        if len(req.participants) < least:
            raise RoundRefused("too_few_participants", f"round {rnd} requires {least} participants, the coordinator "
                               f"names {len(req.participants)}: the aggregate could carry less than the announced "
                               "noise; not aggregated")
        receipts = {r.hospital: r for r in self.store.receipts(rnd)}
        missing = [p for p in req.participants if p not in receipts]
        if missing:
            raise RoundRefused("missing_shares", f"no upload from {missing} for round {rnd}")
        other = [p for p in req.participants if receipts[p].commitment != req.commitments[p]]
        if other:
            raise RoundRefused("inconsistent", f"this party holds a different sharing from {other} for round {rnd} "
                             "than the coordinator names")
        denominator = sum(receipts[p].n_samples for p in req.participants)
        if denominator != req.denominator:
            raise RoundRefused("inconsistent", f"sample counts sum to {denominator}, coordinator says "
                             f"{req.denominator}")
        strategy = get_strategy(cfg.strategy)
        spec = normalise_spec(cfg.spec)
        t0 = time.perf_counter()
        if self.store.global_dir(cfg.version).exists():  # a retry after success: same answer
            return self._result(cfg, req, denominator, file_sha256(self.store.global_dir(cfg.version) / "share.npz"))
        total = self.sums.total(rnd, spec_size(spec), req.participants, lambda p: self.store.load_upload(rnd, p))
        self.sums.forget_before(rnd + 1)
        meta = {"version": cfg.version, "round": rnd, "parties": self.settings.parties,
                "party_index": self.settings.index, "denominator": denominator,
                "participants": list(req.participants), "spec": [[n, list(s)] for n, s in spec],
                "model": cfg.model.model_dump(), "strategy": strategy.name}
        result = strategy.aggregate_shares(total, denominator, cfg, self._server_step)
        meta |= {"denominator": result.denominator, **result.meta}
        digest = self.store.write_global(cfg.version, unflatten(result.total, spec),
                                         GlobalModelMeta.model_validate(meta))
        self.counters["rounds_aggregated"] += 1
        self.metrics.rounds_aggregated.inc()
        self.metrics.aggregation_seconds.observe(time.perf_counter() - t0)
        log.info("party %d aggregated round %d (%d hospitals) into v%d in %.2fs", self.settings.index,
                 rnd, len(req.participants), cfg.version, time.perf_counter() - t0)
        return self._result(cfg, req, denominator, digest)

    def _result(self, cfg: RoundConfig, req: AggregateRequest, denominator: int, digest: str) -> AggregateResult:
        return AggregateResult(round=cfg.round, version=cfg.version, party_index=self.settings.index,
                               participants=list(req.participants), denominator=denominator,
                               share_sha256=digest)

    def _server_step(self, kind: str, cfg: RoundConfig, total, denominator: int):
        """FedAdam/FedYogi on shares in the MPC group (:mod:`cloud_aggregator.mpc.server_opt`)."""
        from cloud_aggregator.inference.errors import InferenceError
        from cloud_aggregator.mpc.server_opt import update_on_shares
        if self.mpc is None:
            raise RoundRefused("no_mpc", f"strategy {cfg.strategy} needs the MPC group (start with --mpc-master)")
        try:
            return update_on_shares(self.mpc, self.settings.data_dir, kind, cfg, total, denominator)
        except InferenceError as err:
            self.counters["server_update_failed"] += 1
            raise RoundRefused("mpc_failed", f"{err.reason}: {err.detail}") from err


def build_mpc_group(settings: PartySettings) -> WorkerSupervisor | None:
    """The party's MPC group (not started) with its job handlers; None without ``mpc_master``.

    Raises ``MpcLinkError`` when the MPC link is not protected (mpc.mpclink)."""
    if not settings.mpc_master:
        return None
    from cloud_aggregator.inference.handler import InferenceHandler
    from cloud_aggregator.mpc.server_opt import run_server_update

    link = resolve_link(settings.mpc_master, settings.index, settings.mpc_address, settings.mpc_interface,
                        settings.mpc_insecure)
    cfg = WorkerConfig(rank=settings.index, world_size=settings.parties, master=settings.mpc_master,
                       data_dir=str(settings.data_dir), provider=settings.mpc_provider, device=settings.mpc_device,
                       link=link, request_timeout=settings.mpc_request_timeout)
    return WorkerSupervisor(cfg, {JobKind.INFER: InferenceHandler(), JobKind.SERVER_UPDATE: run_server_update})


def create_app(settings: PartySettings) -> FastAPI:
    """The party's FastAPI app (plus the encrypted-inference router when installed)."""
    group = build_mpc_group(settings)
    party = Party(settings, group)
    app = FastAPI(title=f"iomt party {settings.index}/{settings.parties}")
    app.state.party = party
    app.state.settings = settings
    app.state.metrics = party.metrics

    def body_limit(route) -> int:  # enforced while the body streams in (cloud_aggregator.web)
        if route.path.endswith("/share") and "PUT" in route.methods:
            return settings.max_upload_bytes
        if route.path.startswith("/inference/"):
            return settings.max_inference_bytes
        return settings.max_body_bytes

    app.router.route_class = bounded_route(body_limit)
    install_error_handlers(app, f"party {settings.index}", party.counters, party.metrics.on_refusal)

    @app.exception_handler(AuthError)
    async def _auth(request: Request, err: AuthError):  # counted and logged by Party.auth
        return error_response(err.status, err.http_error, str(err))

    @app.exception_handler(ShareError)
    async def _share(request: Request, err: ShareError):
        return refuse(request, 400 if err.reason != "too_large" else 413, err.reason, err.detail)

    @app.exception_handler(Refusal)
    async def _refused(request: Request, err: Refusal):  # RoundRefused, UploadRefused
        return refuse(request, _REFUSAL_STATUS.get(err.reason, 409), err.reason, err.detail)

    @app.exception_handler(StoreError)
    async def _store(request: Request, err: StoreError):  # this host's disk, not the request
        log.error("party %d: store failure: %s", settings.index, err)
        return refuse(request, 503, "store_failed", "this party cannot write its store; try again later")

    @app.exception_handler(ConfigError)
    async def _config(request: Request, err: ConfigError):
        return refuse(request, 400, "bad_config", str(err))

    @app.get("/health")
    async def health():
        return {"party_index": settings.index, "parties": settings.parties,
                "latest_version": latest_version(settings.data_dir)}

    readiness = Readiness(f"party {settings.index}", settings.data_dir)

    @app.get("/ready", responses=responses(503))
    async def ready():  # readiness probes: the store writable (cloud_aggregator.readiness)
        mpc = {"configured": group is not None, "ready": bool(group and group.ready)}
        return await run_in_threadpool(readiness.response, party_index=settings.index, mpc=mpc)

    @app.get("/metrics", responses=responses(401, 403))
    async def metrics(request: Request):
        party.auth(request, ("coordinator", "party"))
        return dict(party.counters)

    @app.put("/rounds/{rnd}/share", response_model=UploadAck,
             responses=responses(400, 401, 403, 409, 413, 422, 503))
    async def upload(rnd: RoundNo, request: Request):
        hospital = party.auth(request, ("hospital",))
        raw = await read_body(request)  # 413 as soon as it passes max_upload_bytes
        async with party.lock:  # one upload at a time: the replay check and the write are atomic
            receipt, new = await run_in_threadpool(party.accept, hospital, rnd, raw)
        if new:
            party.counters["uploads_stored"] += 1
            party.metrics.uploads.labels(outcome="stored").inc()
            party.metrics.upload_bytes.inc(len(raw))
            log.info("party %d stored round %d share from %s (%d bytes, sharing %s)", settings.index, rnd, hospital,
                     len(raw), receipt.commitment[:12])
        else:
            party.counters["uploads_repeated"] += 1
            party.metrics.uploads.labels(outcome="repeated").inc()
            log.info("party %d: %s resent its round %d share; already held", settings.index, hospital, rnd)
        return UploadAck(round=rnd, hospital=hospital, party_index=settings.index, sha256=receipt.sha256,
                         commitment=receipt.commitment, stored=new)

    @app.get("/rounds/{rnd}/receipts", response_model=Receipts, responses=responses(401, 403, 422))
    async def receipts(rnd: RoundNo, request: Request):
        party.auth(request, ("coordinator", "party"))
        return Receipts(round=rnd, party_index=settings.index, receipts=party.store.receipts(rnd))

    @app.post("/rounds/{rnd}/aggregate", response_model=AggregateResult,
              responses=responses(400, 401, 403, 409, 413, 422, 503))
    async def aggregate(rnd: RoundNo, req: AggregateRequest, request: Request):
        party.auth(request, ("coordinator",))
        if req.config.round != rnd:
            raise ShareError("wrong_round", "body and URL name different rounds")
        async with party.lock:
            return await run_in_threadpool(party.aggregate, req)

    def _version(version: str) -> int:
        if version == "latest":
            latest = latest_version(settings.data_dir)
            if latest is None:
                raise RoundRefused("no_model", "no global model yet")
            return latest
        return int(version)

    @app.get("/global/{version}/meta", responses=responses(401, 403, 404, 409, 422))
    async def global_meta(version: VersionRef, request: Request):
        party.auth(request, ("hospital", "party", "coordinator"))
        path = party.store.global_dir(_version(version)) / "meta.json"
        if not path.exists():
            return refuse(request, 404, "no_such_version", version)
        return FileResponse(path, media_type="application/json")

    @app.get("/global/{version}/share", responses=responses(401, 403, 404, 409, 422))
    async def global_share(version: VersionRef, request: Request):
        hospital = party.auth(request, ("hospital",))
        number = _version(version)
        path = party.store.global_dir(number) / "share.npz"
        if not path.exists():
            return refuse(request, 404, "no_such_version", version)
        party.counters["global_downloads"] += 1
        party.metrics.global_downloads.inc()
        log.info("party %d sends its share of global model v%d to %s", settings.index, number, hospital)
        return FileResponse(path, media_type="application/octet-stream")

    if group is not None:
        app.router.on_startup.append(group.start)
        app.router.on_shutdown.append(group.stop)
    try:  # encrypted inference lives in its own package and is optional here
        from cloud_aggregator.inference.router import build_router
    except ImportError:
        log.debug("encrypted inference router not installed")
    else:
        app.include_router(build_router(settings, group, route_class=app.router.route_class,
                                        metrics=party.metrics))
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser, PartySettings)
    parser.add_argument("--index", type=int, help="this party's index, 0..n-1")
    parser.add_argument("--parties", type=int, help="number of parties n")
    parser.add_argument("--data-dir", help="where shares and global versions are stored")
    parser.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:8800)")
    parser.add_argument("--registry", help="principal registry JSON (keys, revocations)")
    parser.add_argument("--key-file", help="this party's Ed25519 key file")
    parser.add_argument("--coordinator", help="coordinator base URL (https://host:port)")
    add_tls_arguments(parser, "the coordinator")
    parser.add_argument("--mpc-master", help="host:port of the MPC rendezvous for encrypted inference")
    add_mpc_link_arguments(parser)
    parser.add_argument("--max-samples", type=int,
                        help=f"refuse uploads claiming more samples per hospital and round (default {MAX_SAMPLES_DEFAULT}; "
                             "the coordinator's cap and the registry's per-hospital max_samples also apply)")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on this plain-HTTP port (default: off; deploy/: 9101)")
    parser.add_argument("--metrics-host", help="address of the metrics port (default 127.0.0.1)")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(PartySettings, args.config, {
            "index": args.index, "parties": args.parties, "data_dir": args.data_dir, **listen_flags(args.listen),
            "registry": args.registry, "key_file": args.key_file, "coordinator_url": args.coordinator,
            **tls_flags(args), "mpc_master": args.mpc_master,
            "mpc_address": args.mpc_address, "mpc_interface": args.mpc_interface, "mpc_insecure": args.mpc_insecure,
            "max_samples": args.max_samples, "metrics_port": args.metrics_port, "metrics_host": args.metrics_host},
            flag_names={"coordinator_url": "--coordinator"})
        refused = transport_error(settings, f"party {settings.index}")
        if refused:
            log.error("%s", refused)
            return EXIT_CONFIG
        app = create_app(settings)
    except (ValueError, ConfigError, OSError) as err:  # settings, registry, key file, MPC link
        log.error("bad party settings: %s", err)
        return EXIT_CONFIG
    if not serve_metrics(app.state.metrics.registry, settings, f"party {settings.index}"):
        return EXIT_CONFIG
    serve(app, settings, f"party {settings.index}", app.state.party.counters)
    return EXIT_OK
