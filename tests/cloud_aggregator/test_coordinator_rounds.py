"""The coordinator's round state machine, tick by tick, without processes: open -> closing ->
aggregating -> done or failed, the deadline, min_hospitals, the round limit and a restart.

The parties are stood in for by an in-process HTTP handler that answers the two calls the
coordinator makes (``GET /rounds/{r}/receipts`` and ``POST /rounds/{r}/aggregate``) with the
real typed messages; the coordinator's clock is set by the test.
The parties' own side of these calls runs against real processes in test_rounds.py.
"""
from __future__ import annotations

import asyncio
import json
import types

import httpx
import pytest

from cloud_aggregator import coordinator as coordinator_module
from cloud_aggregator.coordinator import Coordinator
from cloud_aggregator.settings import CoordinatorSettings
from protocols.aggregation_messages import AggregateRequest, AggregateResult, Receipt, Receipts
from protocols.auth import make_credentials

HOSPITALS = ["h1", "h2", "h3"]
PARTIES = ["https://party-0.test", "https://party-1.test"]
T0 = 1_000_000.0
TIMEOUT = 60.0


class Parties:
    """What each party holds: ``uploads[i][hospital] = (n_samples, sharing id)``; ``down`` holds
    the indices of parties that answer 503; ``aggregated`` the requests each party got."""

    def __init__(self) -> None:
        self.uploads: list[dict[str, tuple[int, str]]] = [{} for _ in PARTIES]
        self.down: set[int] = set()
        self.aggregated: list[list[AggregateRequest]] = [[] for _ in PARTIES]

    def upload(self, hospital: str, n: int = 10, sharing: str | None = None) -> None:
        for held in self.uploads:
            held[hospital] = (n, sharing or f"sharing-{hospital}")

    def handle(self, request: httpx.Request) -> httpx.Response:
        i = PARTIES.index(f"{request.url.scheme}://{request.url.host}")
        if i in self.down:
            return httpx.Response(503, json={"error": "unavailable", "detail": "down"})
        rnd = int(request.url.path.split("/")[2])
        if request.url.path.endswith("/receipts"):
            body = Receipts(round=rnd, party_index=i, receipts=[
                Receipt(hospital=h, n_samples=n, sha256="0" * 64, commitment=c)
                for h, (n, c) in sorted(self.uploads[i].items())])
            return httpx.Response(200, content=body.model_dump_json())
        req = AggregateRequest.model_validate_json(request.content)
        self.aggregated[i].append(req)
        result = AggregateResult(round=rnd, version=req.config.version, party_index=i,
                                 participants=req.participants, denominator=req.denominator,
                                 share_sha256=f"{i}" * 64)
        return httpx.Response(200, content=result.model_dump_json())


@pytest.fixture
def clock(monkeypatch):
    """The coordinator's clock (only its module's ``time``, not the process's), set by the test."""
    now = [T0]
    monkeypatch.setattr(coordinator_module, "time", types.SimpleNamespace(time=lambda: now[0]))
    return now


@pytest.fixture
def make(tmp_path, clock):
    registry = make_credentials(tmp_path / "creds", HOSPITALS, len(PARTIES))
    (tmp_path / "model.json").write_text(json.dumps({"arch": "toy", "spec": [["w", [3]]], "init_seed": 4}))

    def build(**kw) -> Coordinator:
        settings = CoordinatorSettings(data_dir=tmp_path / "coord", registry=registry,
                                       key_file=tmp_path / "creds/keys/coordinator.json", party_urls=PARTIES,
                                       model_file=tmp_path / "model.json", round_timeout=TIMEOUT, **kw)
        return Coordinator(settings)
    return build


@pytest.fixture
def parties():
    return Parties()


def tick(coord: Coordinator, parties: Parties, times: int = 1) -> str | None:
    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(parties.handle)) as client:
            for _ in range(times):
                await coord.tick(client)
    asyncio.run(run())
    return coord.current.state if coord.current else None


def test_no_round_before_min_hospitals_then_one_opens_for_those_registered(make, parties):
    coord = make(min_hospitals=2)
    coord.register("h1")
    assert tick(coord, parties) is None
    coord.register("h2")
    assert tick(coord, parties) == "open"
    cfg = coord.current.config
    assert (cfg.round, cfg.version, cfg.base_version, cfg.parties) == (1, 1, None, 2)
    assert cfg.deadline == T0 + TIMEOUT and cfg.model.arch == "toy" and cfg.init_seed == 4
    assert coord.expected[1] == ["h1", "h2"]


def test_a_round_closes_when_every_expected_hospital_is_at_every_party_and_completes(make, parties):
    coord = make(rounds=2)
    for h in ("h1", "h2"):
        coord.register(h)
    tick(coord, parties)
    parties.upload("h1", 10)
    parties.uploads[0]["h2"] = (30, "sharing-h2")  # h2 reached party 0 only: not yet
    assert tick(coord, parties) == "open"
    parties.upload("h2", 30)
    assert tick(coord, parties) == "closing"
    assert tick(coord, parties) == "aggregating"
    status = coord.current
    assert status.participants == ["h1", "h2"] and status.denominator == 40
    assert status.commitments == {"h1": "sharing-h1", "h2": "sharing-h2"}
    assert tick(coord, parties) == "done"
    assert coord.current.share_sha256 == ["0" * 64, "1" * 64]
    assert [len(a) for a in parties.aggregated] == [1, 1]
    assert coord.latest_version() == 1
    # the next tick opens round 2 on top of version 1
    assert tick(coord, parties) == "open"
    assert (coord.current.config.round, coord.current.config.base_version) == (2, 1)


def test_the_deadline_closes_a_round_without_the_missing_hospital(make, parties, clock):
    coord = make()
    for h in HOSPITALS:
        coord.register(h)
    tick(coord, parties)
    parties.upload("h1", 10)
    parties.upload("h3", 5)
    clock[0] = T0 + TIMEOUT - 1
    assert tick(coord, parties) == "open"  # h2 may still come
    clock[0] = T0 + TIMEOUT
    assert tick(coord, parties) == "closing"
    assert tick(coord, parties) == "aggregating"
    assert coord.current.participants == ["h1", "h3"] and coord.current.denominator == 15
    assert tick(coord, parties) == "done"


def test_a_round_with_no_valid_sharing_at_the_deadline_fails_and_the_next_one_opens(make, parties, clock):
    coord = make(rounds=2)
    coord.register("h1")
    tick(coord, parties)
    parties.uploads[0]["h1"] = (10, "one")
    parties.uploads[1]["h1"] = (10, "another")  # two different sharings: summing them is garbage
    clock[0] = T0 + TIMEOUT
    assert tick(coord, parties, times=2) == "failed"
    assert "no hospital" in coord.current.detail and "different sharings" in coord.current.excluded["h1"]
    assert parties.aggregated == [[], []]
    assert coord.latest_version() is None
    assert tick(coord, parties) == "open"
    assert (coord.current.config.round, coord.current.config.base_version) == (2, None)


def test_a_party_down_holds_the_round_where_it_is_and_aggregation_resumes(make, parties):
    coord = make()
    coord.register("h1")
    tick(coord, parties)
    parties.upload("h1")
    assert tick(coord, parties) == "closing"
    parties.down = {1}
    assert tick(coord, parties, times=3) == "closing"  # its acknowledged shares are on its disk
    parties.down = set()
    assert tick(coord, parties) == "aggregating"
    parties.down = {0}
    assert tick(coord, parties) == "aggregating"
    assert coord.current.share_sha256 == [None, "1" * 64] and coord.counters["aggregate_retry"] == 1
    parties.down = set()
    assert tick(coord, parties) == "done"
    assert [len(a) for a in parties.aggregated] == [1, 1]  # party 1 was not asked twice


def test_no_round_past_the_planned_number_and_a_restart_resumes(make, parties):
    coord = make(rounds=1)
    coord.register("h1")
    tick(coord, parties)
    parties.upload("h1")
    assert tick(coord, parties, times=3) == "done"
    assert tick(coord, parties) == "done" and list(coord.rounds) == [1]
    assert coord.status().finished and coord.status().rounds_done == 1
    again = make(rounds=1)  # a coordinator restarted on the same data directory
    assert again.hospitals == ["h1"] and again.current.state == "done" and again.latest_version() == 1


def test_the_operator_page_shows_the_epsilon_each_hospital_reports(make, parties):
    from cloud_aggregator.operator_page.view import Clock, snapshot
    from protocols.aggregation_messages import PrivacySpent

    coord = make()
    for h in ("h1", "h2"):
        coord.register(h)
    tick(coord, parties)
    coord.report_privacy(1, "h1", PrivacySpent(epsilon=3.25, delta=1e-5, limit=8.0))
    state = snapshot(coord, Clock(), [], {})
    shown = state["privacy"]
    # h1's own figure and limit, from the reports the coordinator keeps beside the round status
    assert shown["h1"] == {"spent": 3.25, "limit": 8.0, "delta": 1e-5, "unit": "patient", "mechanism": "dpsgd"}
    assert shown["h2"]["spent"] is None and shown["h2"]["unit"] is None  # nothing reported
    # and the page's live part says it, with its delta and unit
    import jinja2
    from cloud_aggregator.operator_page import operator
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(operator.HERE / "templates"), autoescape=True)
    text = env.get_template("operator_live.html").render(s=state)
    table = text[text.index('data-testid="privacy"'):]
    row = lambda h: table[table.index(f'<th scope="row">{h}</th>'):].split("</tr>")[0]  # noqa: E731
    assert "3.25 at δ = 1e-05, patient level (dpsgd)" in row("h1") and "not reported" not in row("h1")
    assert "not reported" in row("h2")


def _noise(**kw) -> dict:
    return {"distributed_noise_hospitals": 2, "distributed_noise_multiplier": 1.5, "distributed_noise_clip": 0.5, **kw}


def test_distributed_noise_is_announced_and_a_round_of_k_hospitals_aggregates(make, parties):
    coord = make(**_noise())
    coord.register("h1")
    assert tick(coord, parties) is None  # no round before K hospitals could take part
    coord.register("h2")
    assert tick(coord, parties) == "open"
    cfg = coord.current.config
    assert cfg.min_participants == 2 and cfg.distributed_noise.hospitals == 2
    assert (cfg.distributed_noise.noise_multiplier, cfg.distributed_noise.clip_norm) == (1.5, 0.5)
    assert cfg.distributed_noise_refusal() is None
    parties.upload("h1", 10)
    parties.upload("h2", 30)
    assert tick(coord, parties, times=3) == "done"
    status = coord.current
    # the largest hospital's share of the weighted sum gets sigma * sqrt((10^2 + 30^2) / 2) / 30
    assert status.aggregate_noise_multiplier == pytest.approx(1.5 * (1000 / 2) ** 0.5 / 30)
    assert 0 < status.aggregate_epsilon < float("inf")


def test_a_round_with_fewer_participants_than_announced_fails_closed(make, parties, clock, caplog):
    coord = make(rounds=2, **_noise(distributed_noise_hospitals=3))
    for h in HOSPITALS:
        coord.register(h)
    tick(coord, parties)
    parties.upload("h1", 10)
    parties.upload("h2", 10)  # h3 never comes
    clock[0] = T0 + TIMEOUT
    with caplog.at_level("WARNING"):
        assert tick(coord, parties, times=2) == "failed"
    status = coord.current
    assert "only 2 participants" in status.detail and "fewer than the 3" in status.detail
    assert "less than the announced noise" in status.detail and status.participants == []
    assert parties.aggregated == [[], []] and coord.latest_version() is None  # nothing aggregated or published
    assert coord.counters["too_few_participants"] == 1
    assert any("failed closed" in r.getMessage() for r in caplog.records)
    assert tick(coord, parties) == "open" and coord.current.config.round == 2  # the federation goes on


def test_a_coordinator_never_announces_fewer_participants_than_k(make):
    with pytest.raises(ValueError, match="min_participants 1 < distributed_noise_hospitals 2"):
        make(**_noise(min_participants=1))
    with pytest.raises(ValueError, match="needs distributed_noise_multiplier"):
        make(distributed_noise_hospitals=2)


def test_a_hospital_refuses_a_config_without_k_or_with_fewer_participants_than_k(make, parties):
    from edge_server.federation.client import DistributedNoiseRefused, distributed_noise_check
    from protocols.aggregation_messages import DistributedNoise

    coord = make()
    coord.register("h1")
    tick(coord, parties)
    plain = coord.current.config
    distributed_noise_check(plain, required=False)  # nothing asked, nothing announced
    with pytest.raises(DistributedNoiseRefused, match="announces no distributed noise with K"):
        distributed_noise_check(plain, required=True)
    no_k = plain.model_copy(update={"distributed_noise": DistributedNoise(noise_multiplier=1.0, clip_norm=1.0)})
    with pytest.raises(DistributedNoiseRefused, match="without K|no distributed noise with K"):
        distributed_noise_check(no_k, required=False)  # announced without K: refused even if not required
    few = plain.model_copy(update={"distributed_noise": DistributedNoise(hospitals=3, noise_multiplier=1.0,
                                                                           clip_norm=1.0), "min_participants": 2})
    with pytest.raises(DistributedNoiseRefused, match="close with 2 participants, fewer than K = 3"):
        distributed_noise_check(few, required=True)
    distributed_noise_check(few.model_copy(update={"min_participants": 3}), required=True)
