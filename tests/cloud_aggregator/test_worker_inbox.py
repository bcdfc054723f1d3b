"""The party worker's inbox: how it takes shares off its queue (no MPC group needed)."""
from __future__ import annotations

import queue
import threading

from cloud_aggregator.mpc import Job, WorkerConfig, WorkerLoop


def _loop(rank: int) -> WorkerLoop:
    loop = object.__new__(WorkerLoop)  # the queue side only: no CrypTen communicator
    loop.cfg = WorkerConfig(rank, 2, "127.0.0.1:1", "unused")
    loop.jobs, loop.inbox, loop.stopping = queue.Queue(), {}, False
    return loop


def test_waiting_party_takes_a_share_as_soon_as_one_arrives():
    """Party 1 waits for the share of the request party 0 announced: once one arrives it takes
    what else is queued and returns, instead of waiting out its whole timeout (it used to: 50 ms
    on every request)."""
    loop = _loop(1)
    loop.jobs.put(Job("a", "h", 1, {}))
    later = threading.Timer(1.0, loop.jobs.put, args=(Job("b", "h", 1, {}),))
    later.start()
    try:
        assert loop._drain(30.0) is None  # a non-zero party never schedules
        assert list(loop.inbox) == ["a"]  # returned with "a", without waiting for "b"
    finally:
        later.cancel()


def test_party_zero_returns_jobs_one_at_a_time_in_arrival_order():
    loop = _loop(0)
    for rid in ("a", "b"):
        loop.jobs.put(Job(rid, "h", 1, {}))
    assert loop._drain(1.0).request_id == "a"
    assert loop._drain(1.0).request_id == "b"
    assert loop._drain(0.0) is None
    loop.jobs.put(None)
    assert loop._drain(1.0) is None and loop.stopping
