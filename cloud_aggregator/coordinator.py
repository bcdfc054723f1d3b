"""`iomt cloud coordinator`: registers hospitals, opens and closes rounds, fixes each
round's participant set and tells every party to aggregate exactly that set.

It never receives a share: it only sees receipts (hospital, sample count, sha256 of the
upload, sharing id) from the parties. A hospital is a participant of a round iff every party
acknowledged its upload before the round closed (deadline, or earlier once every
registered hospital is in), all parties hold the same sharing of it (one sharing id) with
one sample count, and that count is within the cap; the others are excluded consistently
because the parties aggregate the explicit list (with each sharing id) they are sent. State is persisted, so a restarted
coordinator resumes the round where it was.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Annotated

import httpx
from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from cloud_aggregator.metrics import CoordinatorMetrics, serve_metrics
from cloud_aggregator.readiness import Readiness
from cloud_aggregator.serve import add_tls_arguments, listen_flags, serve, tls_flags, transport_error
from cloud_aggregator.settings import CoordinatorSettings
from cloud_aggregator.store import atomic_write
from cloud_aggregator.strategies import get_strategy
from cloud_aggregator.web import bounded_route, error_response, install_error_handlers, read_body, refuse, responses
from protocols.aggregation_messages import (MAX_SAMPLES_DEFAULT, AggregateRequest, AggregateResult,
                                            DistributedNoise, FederationStatus, PrivacySpent, Receipts,
                                            RoundConfig, RoundStatus, ServerOptConfig)
from protocols.auth import AuthError, Registry, Signer
from protocols.tls_client import PinnedTransport
from protocols.config import add_config_argument, load_settings
from protocols.dp_noise import distributed_noise_multiplier, gaussian_epsilon
from protocols.errors import ConfigError
from protocols.model_files import CoordinatorModelFile
from protocols.params import spec_hash

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG = 0, 2


class Coordinator:
    """Round bookkeeping; :meth:`tick` advances the current round one step."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        strategy = get_strategy(settings.strategy)  # refuse unknown or unimplemented strategies up front
        #: what every round config carries for this strategy (prox_mu, server optimiser)
        self.strategy_fields = strategy.round_fields(
            prox_mu=settings.prox_mu, server_opt=ServerOptConfig(lr=settings.server_lr, beta1=settings.beta1,
                                                                 beta2=settings.beta2, tau=settings.tau))
        self.registry = Registry(settings.registry, max_ttl=settings.max_token_ttl)
        self.signer = Signer.from_file(settings.key_file)
        model = CoordinatorModelFile.read(settings.model_file)
        self.spec = model.param_spec()
        self.model = model.model
        self.init_seed = model.init_seed
        #: a round closing with fewer participants fails closed (settings.min_participants)
        self.min_participants = settings.min_participants or 1
        self.distributed_noise = None if settings.distributed_noise_hospitals is None else DistributedNoise(
            hospitals=settings.distributed_noise_hospitals, noise_multiplier=settings.distributed_noise_multiplier,
            clip_norm=settings.distributed_noise_clip)
        self.counters: collections.Counter[str] = collections.Counter()
        self.state_path = Path(settings.data_dir) / "coordinator_state.json"
        self.hospitals: list[str] = []
        self.rounds: dict[int, RoundStatus] = {}
        self.expected: dict[int, list[str]] = {}
        # what each hospital reports of its own privacy ledger, per round (shown in round status)
        self.privacy: dict[int, dict[str, PrivacySpent]] = {}
        #: the Prometheus metrics (served on metrics_host:metrics_port by ``run``)
        self.metrics = CoordinatorMetrics(len(settings.party_urls))
        self.metrics.hospitals.set_function(lambda: float(len(self.hospitals)))
        #: when (time.time) each round in this process entered ``aggregating`` (aggregation time)
        self._aggregating_since: dict[int, float] = {}
        self._load()
        if self.current is not None:
            self._show(self.current)

    # persistence ----------------------------------------------------------------------
    def _load(self) -> None:
        if not self.state_path.exists():
            return
        data = json.loads(self.state_path.read_text())
        self.hospitals = data["hospitals"]
        self.rounds = {int(k): RoundStatus.model_validate(v) for k, v in data["rounds"].items()}
        self.expected = {int(k): v for k, v in data["expected"].items()}
        self.privacy = {int(r): {h: PrivacySpent.model_validate(v) for h, v in spent.items()}
                        for r, spent in data.get("privacy", {}).items()}
        log.info("coordinator resumed: %d rounds known", len(self.rounds))

    def _save(self) -> None:
        data = {"hospitals": self.hospitals, "expected": self.expected,
                "rounds": {r: s.model_dump(mode="json") for r, s in self.rounds.items()},
                "privacy": {r: {h: v.model_dump(mode="json") for h, v in spent.items()}
                            for r, spent in self.privacy.items()}}
        atomic_write(self.state_path, json.dumps(data).encode())

    def _set(self, status: RoundStatus) -> None:
        self.rounds[status.config.round] = status
        self._save()
        self._show(status)

    def _show(self, status: RoundStatus) -> None:
        if status.config.round >= max(self.rounds, default=0):
            self.metrics.round.set(status.config.round)
            self.metrics.round_state.state(status.state)

    # public view ----------------------------------------------------------------------
    @property
    def current(self) -> RoundStatus | None:
        return self.rounds[max(self.rounds)] if self.rounds else None

    def round_view(self, rnd: int) -> RoundStatus:
        """Round ``rnd``'s status with the privacy each hospital reported for it."""
        return self.rounds[rnd].model_copy(update={"privacy": dict(self.privacy.get(rnd, {}))})

    def report_privacy(self, rnd: int, hospital: str, spent: PrivacySpent) -> None:
        """Record the ε ``hospital`` says it has spent after round ``rnd`` (its own figure)."""
        if rnd not in self.rounds or hospital not in self.expected.get(rnd, []):
            raise KeyError(f"{hospital} is not in round {rnd}")
        self.privacy.setdefault(rnd, {})[hospital] = spent
        self._save()
        self.metrics.privacy_reports.inc()
        log.info("round %d: %s reports epsilon %s at delta %g (%s level, %s)", rnd, hospital,
                 "inf" if spent.epsilon is None else f"{spent.epsilon:.3g}", spent.delta, spent.unit, spent.mechanism)

    def latest_version(self) -> int | None:
        done = [s.config.version for s in self.rounds.values() if s.state == "done"]
        return max(done) if done else None

    def status(self) -> FederationStatus:
        finished = len(self.rounds) >= self.settings.rounds and all(
            s.state in ("done", "failed") for s in self.rounds.values())
        return FederationStatus(current=self.round_view(max(self.rounds)) if self.rounds else None,
                                latest_version=self.latest_version(),
                                rounds_done=sum(s.state == "done" for s in self.rounds.values()),
                                rounds_planned=self.settings.rounds, finished=finished,
                                parties=list(self.settings.party_urls))

    def register(self, hospital: str) -> None:
        if hospital not in self.hospitals:
            self.hospitals.append(hospital)
            self._save()
            log.info("hospital %s registered (%d in the federation)", hospital, len(self.hospitals))
        else:
            log.info("hospital %s registered again (%d in the federation)", hospital, len(self.hospitals))

    # round state machine --------------------------------------------------------------
    def _open(self, rnd: int) -> None:
        cfg = RoundConfig(round=rnd, version=rnd, base_version=self.latest_version(),
                          deadline=time.time() + self.settings.round_timeout,
                          strategy=self.settings.strategy, **self.strategy_fields,
                          parties=len(self.settings.party_urls),
                          spec=[(n, list(s)) for n, s in self.spec], spec_hash=spec_hash(self.spec),
                          model=self.model, init_seed=self.init_seed, max_samples=self.settings.max_samples,
                          min_participants=self.min_participants, distributed_noise=self.distributed_noise)
        self.expected[rnd] = list(self.hospitals)
        self._set(RoundStatus(config=cfg, state="open", share_sha256=[None] * cfg.parties))
        self.metrics.rounds_opened.inc()
        log.info("round %d opened for %s, deadline in %.0fs", rnd, self.hospitals, self.settings.round_timeout)

    async def _receipts(self, client: httpx.AsyncClient, rnd: int) -> list[Receipts] | None:
        async def one(i: int, url: str) -> Receipts | None:
            try:
                resp = await client.get(f"{url}/rounds/{rnd}/receipts", headers=self.signer.headers(f"party-{i}"))
                resp.raise_for_status()
                return Receipts.model_validate_json(resp.content)
            except (httpx.HTTPError, ValueError) as err:
                self.counters["party_unreachable"] += 1
                self.metrics.party_errors.labels(party=str(i), call="receipts").inc()
                log.warning("party %d (%s) did not answer for round %d receipts: %s", i, url, rnd, err)
                return None
        got = await asyncio.gather(*(one(i, u) for i, u in enumerate(self.settings.party_urls)))
        self.metrics.parties_answering.set(sum(g is not None for g in got))
        return None if any(g is None for g in got) else list(got)

    def _participants(self, rnd: int, all_receipts: list[Receipts]) -> tuple[list[str], int, dict, dict]:
        """Hospitals every party holds one and the same sharing from, with a bounded sample count.

        Returns ``(participants, denominator, commitments, excluded)``: the sharing id each
        participant is aggregated with, and why each other hospital some party holds was left
        out. A hospital whose parties hold pieces of different sharings (say a retry that drew
        new randomness) would sum to garbage, and a sample count above the cap would outweigh
        every other hospital; both are left out, counted and logged, never aggregated.
        """
        allowed = set(self.registry.principals("hospital"))
        per_party = [{r.hospital: r for r in rec.receipts} for rec in all_receipts]
        common = set.intersection(*(set(p) for p in per_party)) & allowed
        participants, denominator, commitments, excluded = [], 0, {}, {}
        for h in sorted(common):
            sharings = {p[h].commitment for p in per_party}
            counts = {p[h].n_samples for p in per_party}
            cap = min(c for c in (self.settings.max_samples, self.registry.max_samples(h)) if c is not None)
            if len(sharings) != 1 or len(counts) != 1:
                self.counters["inconsistent_upload"] += 1
                self.metrics.excluded.labels(reason="inconsistent_upload").inc()
                excluded[h] = (f"parties hold different sharings {sorted(c[:12] for c in sharings)}"
                               if len(sharings) != 1 else f"parties were told different sample counts {sorted(counts)}")
            elif max(counts) > cap:
                self.counters["too_many_samples"] += 1
                self.metrics.excluded.labels(reason="too_many_samples").inc()
                excluded[h] = f"claims {max(counts)} samples, at most {cap} accepted"
            else:
                participants.append(h)
                denominator += counts.pop()
                commitments[h] = sharings.pop()
                continue
            log.warning("round %d: %s excluded: %s", rnd, h, excluded[h])
        return participants, denominator, commitments, excluded

    @staticmethod
    def _counts(receipts: list[Receipts], participants: list[str]) -> list[int]:
        held = {r.hospital: r.n_samples for r in receipts[0].receipts}
        return [held[h] for h in participants]

    def _aggregate_noise(self, rnd: int, counts: list[int]) -> dict:
        """With distributed noise: the noise multiplier this round's aggregate carries for its
        most exposed participant, and the hospital-level ε of every aggregate so far."""
        dn = self.distributed_noise
        if dn is None:
            return {}
        sigma = distributed_noise_multiplier(dn.noise_multiplier, counts, dn.hospitals)
        earlier = [s.aggregate_noise_multiplier for r, s in self.rounds.items()
                   if r < rnd and s.state == "done" and s.aggregate_noise_multiplier]
        eps = gaussian_epsilon([*earlier, sigma], dn.delta)
        log.info("round %d: aggregate noise multiplier %.3g for its most exposed hospital, hospital-level "
                 "epsilon %.3g at delta %g over %d rounds", rnd, sigma, eps, dn.delta, len(earlier) + 1)
        return {"aggregate_noise_multiplier": sigma, "aggregate_epsilon": None if math.isinf(eps) else eps}

    async def tick(self, client: httpx.AsyncClient) -> None:
        cur = self.current
        if cur is None or cur.state in ("done", "failed"):
            nxt = 1 if cur is None else cur.config.round + 1
            if nxt <= self.settings.rounds and len(self.hospitals) >= max(self.settings.min_hospitals,
                                                                         self.min_participants):
                self._open(nxt)
            return
        rnd = cur.config.round
        if cur.state == "open":
            receipts = await self._receipts(client, rnd)
            expected = set(self.expected.get(rnd, []))
            everyone_in = receipts is not None and expected and all(
                expected <= {r.hospital for r in rec.receipts} for rec in receipts)
            if everyone_in or time.time() >= cur.config.deadline:
                self._set(cur.model_copy(update={"state": "closing"}))
                self.metrics.rounds_closed.labels(trigger="all_in" if everyone_in else "deadline").inc()
                log.info("round %d closing (%s)", rnd, "all registered hospitals in" if everyone_in else "deadline")
            return
        if cur.state == "closing":
            receipts = await self._receipts(client, rnd)
            if receipts is None:
                return  # a party is down: wait for it, its acknowledged shares are on its disk
            participants, denominator, commitments, excluded = self._participants(rnd, receipts)
            if not participants:
                self._set(cur.model_copy(update={"state": "failed", "excluded": excluded,
                                                 "detail": "no hospital reached every party with one valid sharing"}))
                self.metrics.rounds_failed.labels(reason="no_participants").inc()
                self.metrics.participants.set(0)
                log.warning("round %d failed: no hospital uploaded one valid sharing to every party in time", rnd)
                return
            if len(participants) < cur.config.min_participants:
                # Fail closed: with distributed noise, fewer than K noise shares would publish an
                # aggregate carrying less noise than announced; the parties are never asked.
                self.counters["too_few_participants"] += 1
                detail = (f"only {len(participants)} participants {participants}, fewer than the "
                          f"{cur.config.min_participants} this round requires"
                          + (f" (K = {cur.config.distributed_noise.hospitals}: the aggregate would carry less than "
                             "the announced noise)" if cur.config.distributed_noise else "")
                          + "; not aggregated, nothing published")
                self._set(cur.model_copy(update={"state": "failed", "participants": [], "excluded": excluded,
                                                 "detail": detail}))
                log.warning("round %d failed closed: %s", rnd, detail)
                return
            noise = self._aggregate_noise(rnd, self._counts(receipts, participants))
            dropped = sorted(set(self.expected.get(rnd, [])) - set(participants))
            self._set(cur.model_copy(update={"state": "aggregating", "participants": participants,
                                             "denominator": denominator, "commitments": commitments,
                                             "excluded": excluded, **noise}))
            self.metrics.participants.set(len(participants))
            self._aggregating_since[rnd] = time.time()
            log.info("round %d participants %s (N=%d), excluded %s", rnd, participants, denominator, dropped)
            return
        if cur.state == "aggregating":
            await self._aggregate(client, cur)

    async def _aggregate(self, client: httpx.AsyncClient, cur: RoundStatus) -> None:
        req = AggregateRequest(config=cur.config, participants=cur.participants, denominator=cur.denominator,
                               commitments=cur.commitments)
        hashes = list(cur.share_sha256)

        async def one(i: int, url: str) -> None:
            if hashes[i] is not None:
                return
            try:
                resp = await client.post(f"{url}/rounds/{cur.config.round}/aggregate",
                                         content=req.model_dump_json(),
                                         headers={**self.signer.headers(f"party-{i}"),
                                                  "content-type": "application/json"}, timeout=600.0)
                resp.raise_for_status()
                hashes[i] = AggregateResult.model_validate_json(resp.content).share_sha256
            except (httpx.HTTPError, ValueError) as err:
                self.counters["aggregate_retry"] += 1
                self.metrics.party_errors.labels(party=str(i), call="aggregate").inc()
                log.warning("party %d could not aggregate round %d yet: %s", i, cur.config.round, err)

        await asyncio.gather(*(one(i, u) for i, u in enumerate(self.settings.party_urls)))
        done = all(h is not None for h in hashes)
        self._set(cur.model_copy(update={"share_sha256": hashes, "state": "done" if done else "aggregating"}))
        if done:
            rnd = cur.config.round
            since = self._aggregating_since.pop(rnd, None)
            if since is not None:  # not after a restart mid-aggregation: that time is unknown
                self.metrics.aggregation_seconds.observe(max(0.0, time.time() - since))
            opened = cur.config.deadline - self.settings.round_timeout
            self.metrics.round_seconds.observe(max(0.0, time.time() - opened))
            self.metrics.rounds_done.inc()
            log.info("round %d done: global version %d (%d hospitals)", rnd, cur.config.version,
                     len(cur.participants))

    async def loop(self) -> None:
        # party i's URL accepts only party i's certificate (protocols.tls_client.PinnedTransport)
        transport = PinnedTransport(httpx.AsyncHTTPTransport(verify=self.settings.client_tls()),
                                    {u: f"party-{i}" for i, u in enumerate(self.settings.party_urls)})
        async with httpx.AsyncClient(transport=transport, timeout=10.0) as client:
            while True:
                try:
                    await self.tick(client)
                except Exception:  # one bad tick must not stop the federation
                    log.exception("coordinator tick failed")
                await asyncio.sleep(self.settings.poll_interval)


def create_app(settings: CoordinatorSettings) -> FastAPI:
    coord = Coordinator(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(coord.loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(title="iomt coordinator", lifespan=lifespan)
    app.state.coordinator = coord
    app.state.metrics = coord.metrics
    # no route takes more than an (empty) registration body; the limit holds while it streams in
    app.router.route_class = bounded_route(lambda route: settings.max_body_bytes)
    install_error_handlers(app, "coordinator", coord.counters, coord.metrics.on_refusal)

    def auth(request: Request, roles: tuple[str, ...]) -> str:
        try:
            return coord.registry.verify_header(request.headers.get("authorization"), settings.principal, roles).sub
        except AuthError as err:
            coord.counters[f"auth_rejected_{err.status}"] += 1
            coord.metrics.tokens_refused.labels(reason=err.reason).inc()
            log.warning("coordinator refused %s %s: %s", request.method, request.url.path, err)
            raise

    @app.exception_handler(AuthError)
    async def _auth(request: Request, err: AuthError):  # counted and logged by auth()
        return error_response(err.status, err.http_error, str(err))

    @app.get("/health")
    async def health():
        return {"ok": True}

    readiness = Readiness("coordinator", settings.data_dir)

    @app.get("/ready", responses=responses(503))
    async def ready():  # readiness probes: the round state writable (cloud_aggregator.readiness)
        return await run_in_threadpool(readiness.response)

    @app.post("/hospitals/register", response_model=FederationStatus, responses=responses(401, 403, 413))
    async def register(request: Request):
        hospital = auth(request, ("hospital",))
        await read_body(request)  # the body is unused, but bounded: 413 past max_body_bytes
        coord.register(hospital)
        return coord.status()

    @app.get("/status", response_model=FederationStatus, responses=responses(401, 403))
    async def status(request: Request):
        auth(request, ("hospital", "party", "coordinator"))
        return coord.status()

    @app.get("/rounds/{rnd}", response_model=RoundStatus, responses=responses(401, 403, 404, 422))
    async def round_status(rnd: Annotated[int, PathParam(ge=1, le=10**9)], request: Request):
        auth(request, ("hospital", "party", "coordinator"))
        if rnd not in coord.rounds:
            return refuse(request, 404, "unknown_round", str(rnd))
        return coord.round_view(rnd)

    @app.post("/rounds/{rnd}/privacy", response_model=RoundStatus, responses=responses(400, 401, 403, 404, 413, 422))
    async def report_privacy(rnd: Annotated[int, PathParam(ge=1, le=10**9)], spent: PrivacySpent,
                             request: Request):
        """A hospital's own report of the epsilon it has spent after round ``rnd`` (displayed only;
        the bounded route refuses a large or deeply nested body, validation answers 422)."""
        hospital = auth(request, ("hospital",))
        try:
            coord.report_privacy(rnd, hospital, spent)
        except KeyError as err:
            return refuse(request, 404, "unknown_round", str(err))
        return coord.round_view(rnd)

    @app.get("/metrics", responses=responses(401, 403))
    async def metrics(request: Request):
        auth(request, ("coordinator", "party"))
        return dict(coord.counters)

    from cloud_aggregator.operator_page import install_operator_page
    install_operator_page(app, coord)  # the read-only operator's page at /operator
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser, CoordinatorSettings)
    parser.add_argument("--data-dir", help="where the coordinator keeps its round state")
    parser.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:8790)")
    parser.add_argument("--registry", help="principal registry JSON (keys, revocations)")
    parser.add_argument("--key-file", help="the coordinator's Ed25519 key file")
    parser.add_argument("--party", action="append", dest="parties",
                        help="a party's base URL, in index order (repeat; config key party_urls)")
    parser.add_argument("--model", help="model JSON: arch, config, spec, init_seed (config key model_file)")
    parser.add_argument("--rounds", type=int, help="rounds to run (default 3)")
    parser.add_argument("--round-timeout", type=float, help="seconds from open to deadline (default 60)")
    parser.add_argument("--min-hospitals", type=int, help="hospitals registered before round 1 opens (default 1)")
    parser.add_argument("--strategy", help="fedavg (default), fedprox, fedadam or fedyogi "
                        "(the last two need the parties' MPC group: --mpc-master and `iomt cloud triples`)")
    parser.add_argument("--server-lr", type=float, help="FedAdam/FedYogi server learning rate (default 0.01)")
    parser.add_argument("--beta1", type=float, help="default 0.9")
    parser.add_argument("--beta2", type=float, help="default 0.99")
    parser.add_argument("--tau", type=float, help="FedAdam/FedYogi adaptivity tau (default 1e-3)")
    parser.add_argument("--prox-mu", type=float, help="FedProx proximal weight (default 0)")
    parser.add_argument("--max-samples", type=int,
                        help=f"most samples a hospital may claim per round (default {MAX_SAMPLES_DEFAULT}; the "
                             "registry may declare less per hospital); larger claims are left out")
    add_tls_arguments(parser, "the parties")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on this plain-HTTP port (default: off; deploy/: 9102)")
    parser.add_argument("--metrics-host", help="address of the metrics port (default 127.0.0.1)")
    parser.add_argument("--min-participants", type=int,
                        help="a round closing with fewer participants fails closed: never aggregated or published "
                             "(default 1; K with --distributed-noise, and never less than K)")
    g = parser.add_argument_group(
        "distributed noise (hospital-level DP of the aggregate)",
        "Each hospital clips its whole model update to C and adds N(0, sigma^2 C^2 / K); the secure sum of "
        "at least K updates then carries N(0, sigma^2 C^2). On top of each hospital's patient-level DP-SGD "
        "(which protects each patient against everyone and is unchanged), this adds hospital-level DP of every "
        "released aggregate: one hospital's whole update is hidden, up to the aggregate_epsilon the round status "
        "reports, from whoever sees only global models (clinicians and what the model answers, anyone given the "
        "model, this coordinator), assuming the parties do not collude and at least K participants add their "
        "share; participation and sample counts stay public. It is weaker against a participating hospital, "
        "which can subtract its own share (P equal participants keep sigma*sqrt((P-1)/K) against one), and adds "
        "nothing against colluding parties, who see single updates carrying 1/K of the variance. Rounds with "
        "fewer than "
        "--min-participants fail closed. README: Model and private training.")
    g.add_argument("--distributed-noise", type=int, metavar="K", dest="distributed_noise_hospitals",
                   help="K: announce distributed noise, each participant adding 1/K of the variance")
    g.add_argument("--distributed-noise-multiplier", type=float, metavar="SIGMA",
                   help="sigma of the aggregate's noise (std sigma x C)")
    g.add_argument("--distributed-noise-clip", type=float, metavar="C",
                   help="L2 bound on each hospital's whole update")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(CoordinatorSettings, args.config, {
            "data_dir": args.data_dir, **listen_flags(args.listen), "registry": args.registry,
            "key_file": args.key_file, "party_urls": args.parties, "rounds": args.rounds,
            "round_timeout": args.round_timeout, "min_hospitals": args.min_hospitals, "strategy": args.strategy,
            "prox_mu": args.prox_mu, "model_file": args.model, "server_lr": args.server_lr, "beta1": args.beta1,
            "beta2": args.beta2, "tau": args.tau, "max_samples": args.max_samples, **tls_flags(args),
            "metrics_port": args.metrics_port, "metrics_host": args.metrics_host,
            "min_participants": args.min_participants,
            "distributed_noise_hospitals": args.distributed_noise_hospitals,
            "distributed_noise_multiplier": args.distributed_noise_multiplier,
            "distributed_noise_clip": args.distributed_noise_clip},
            flag_names={"party_urls": "--party", "model_file": "--model"})
        refused = transport_error(settings, "coordinator")
        if refused:
            log.error("%s", refused)
            return EXIT_CONFIG
        app = create_app(settings)
    except (ValueError, ConfigError, OSError) as err:
        log.error("bad coordinator settings: %s", err)
        return EXIT_CONFIG
    if not serve_metrics(app.state.metrics.registry, settings, "coordinator"):
        return EXIT_CONFIG
    serve(app, settings, "coordinator", app.state.coordinator.counters)
    return EXIT_OK
