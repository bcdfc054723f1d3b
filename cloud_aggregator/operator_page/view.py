"""What the operator's page shows, computed from the coordinator's state (read-only)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from protocols.aggregation_messages import RoundStatus
from protocols.tls_client import pin_extensions

#: Seconds a parties' health answer is reused (the page polls every second).
PARTY_CACHE_S = 2.0
PARTY_TIMEOUT_S = 2.0


@dataclass
class Clock:
    """When this coordinator process first saw each round in each state (the timeline)."""

    seen: dict[tuple[int, str], float] = field(default_factory=dict)

    def observe(self, rounds: dict[int, RoundStatus]) -> None:
        now = time.time()
        for rnd, status in rounds.items():
            self.seen.setdefault((rnd, status.state), now)

    def at(self, rnd: int, state: str) -> float | None:
        return self.seen.get((rnd, state))


def _fmt_time(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "—"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _privacy(coord, hospitals: list[str]) -> dict[str, dict]:
    """ε spent against its limit per hospital: the newest figure each hospital reported
    (``POST /rounds/{r}/privacy``, kept in ``coord.privacy`` beside the round statuses, which
    carry it only through :meth:`~cloud_aggregator.coordinator.Coordinator.round_view`). ``unit``
    is None for a hospital that has reported nothing; ``spent`` None after a report is ε = ∞."""
    out = {h: {"spent": None, "limit": None, "delta": None, "unit": None, "mechanism": None} for h in hospitals}
    for rnd in sorted(coord.privacy):
        for h, spent in coord.privacy[rnd].items():
            out[h] = {"spent": spent.epsilon, "limit": spent.limit, "delta": spent.delta, "unit": spent.unit,
                      "mechanism": spent.mechanism}
    return out


async def party_health(urls: list[str], verify) -> list[dict]:
    """Each party's ``/health`` and ``/inference/v1/status``, or why it did not answer."""
    async with httpx.AsyncClient(verify=verify, timeout=PARTY_TIMEOUT_S) as client:
        async def one(i: int, url: str) -> dict:
            row = {"index": i, "url": url, "up": False, "latest_version": None, "mpc": "unknown",
                   "restarts": None, "error": ""}
            try:
                pin = pin_extensions(url, f"party-{i}")  # only party i's certificate at its URL
                health = (await client.get(f"{url}/health", extensions=pin)).json()
                row.update(up=True, latest_version=health.get("latest_version"))
                mpc = (await client.get(f"{url}/inference/v1/status", extensions=pin)).json()
                row["mpc"] = ("ready" if mpc.get("ready") else "waiting") if mpc.get("configured") else "off"
                row["restarts"] = mpc.get("restarts")
            except (httpx.HTTPError, ValueError) as err:
                row["error"] = str(err) or type(err).__name__
            return row
        return list(await asyncio.gather(*(one(i, u) for i, u in enumerate(urls))))


def snapshot(coord, clock: Clock, parties: list[dict], last_seen: dict[str, float]) -> dict:
    """Everything the page shows, as plain data (also served as ``/operator/state.json``)."""
    settings = coord.settings
    rounds = dict(coord.rounds)
    clock.observe(rounds)
    n_params = sum(int(_prod(shape)) for _, shape in coord.spec)
    registered = sorted(set(coord.hospitals) | set(coord.registry.principals("hospital")))
    hospitals = []
    for h in registered:
        taken = [r for r, s in rounds.items() if h in s.participants]
        hospitals.append({"name": h, "registered": h in coord.hospitals, "last_seen": last_seen.get(h),
                          "last_seen_text": _fmt_time(last_seen.get(h)), "rounds": len(taken),
                          "round_list": sorted(taken)})
    timeline = []
    for rnd in sorted(rounds, reverse=True):
        s = rounds[rnd]
        opened = s.config.deadline - settings.round_timeout
        ended = clock.at(rnd, s.state) if s.state in ("done", "failed") else None
        expected = coord.expected.get(rnd, [])
        excluded = sorted(set(expected) - set(s.participants)) if s.state in ("aggregating", "done") else []
        why = s.detail or (f"excluded: {', '.join(excluded)} (no share at every party before the round closed)"
                           if excluded else "")
        volume = len(s.participants) * s.config.parties * n_params * 8
        timeline.append({"round": rnd, "version": s.config.version, "state": s.state,
                         "opened": _fmt_time(opened), "ended": _fmt_time(ended),
                         "duration": f"{ended - opened:.1f} s" if ended else f"{time.time() - opened:.0f} s so far",
                         "participants": list(s.participants), "expected": expected,
                         "bytes": volume, "bytes_text": _fmt_bytes(volume) if volume else "—",
                         "failure": why, "strategy": s.config.strategy})
    versions = [{"version": s.config.version, "round": r, "hashes": list(s.share_sha256),
                 "participants": list(s.participants), "denominator": s.denominator,
                 "spec_hash": s.config.spec_hash}
                for r, s in sorted(rounds.items(), reverse=True) if s.state == "done"]
    status = coord.status()
    return {"time": time.time(), "time_text": _fmt_time(time.time()), "hospitals": hospitals,
            "rounds": timeline, "versions": versions, "parties": parties,
            "privacy": _privacy(coord, registered),
            "summary": {"rounds_done": status.rounds_done, "rounds_planned": status.rounds_planned,
                        "latest_version": status.latest_version, "finished": status.finished,
                        "strategy": settings.strategy, "parameters": n_params,
                        "min_hospitals": settings.min_hospitals},
            "counters": dict(coord.counters)}


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out
