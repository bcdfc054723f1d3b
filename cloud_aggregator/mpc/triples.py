"""Offline phase for encrypted inference: Beaver triples fetched from the TTP before a request.

Every secret multiplication needs a triple from the trusted third party; fetched on demand,
that is three extra messages to the TTP (request, size, tensor) in front of the one round
between the parties, so about three quarters of a request's rounds. The triples depend only
on the *shapes* of the computation, never on its values, so they can be fetched while the
parties are idle (the usual offline/online split of MPC).

:class:`TriplePrefetcher` uses CrypTen's own provider tracing: the first request of a given
signature (model version and input shapes) runs with on-demand triples and records what it
asked for; after every request the parties fetch one request's worth for that signature
again, and the next request with that signature pops them from the cache. Both parties run
exactly the same sequence of provider calls, so their caches stay aligned; the worker
compares :meth:`TriplePrefetcher.fingerprint` across parties before each request and clears
both caches if they ever differ (e.g. one party failed to load a model).

Each cached tuple is used once (popped) and nothing about it depends on any input, so the
parties learn nothing they would not learn with on-demand triples.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)

#: Request signatures whose traces are kept (least recently used dropped first).
MAX_PLANS = 4
#: At most this many cached tuples (each a request's worth for one signature is ~100-600).
MAX_CACHED = 20_000


class _TupleCache(dict):
    """CrypTen's tuple cache, but an exhausted request counts as absent.

    ``TupleProvider`` looks a request up with ``request in cache.keys()`` and then pops;
    with a plain dict a request whose list ran dry raises ``IndexError``. Here it falls
    back to an on-demand triple instead.
    """

    def keys(self):  # noqa: D102 - see class docstring
        return {k for k, v in self.items() if v}

    def __len__(self) -> int:
        return sum(1 for v in self.values() if v)

    def count(self) -> int:
        return sum(len(v) for v in self.values())


class TriplePrefetcher:
    """Trace a request's provider calls once per signature; refill them between requests."""

    def __init__(self, crypten: Any, enabled: bool = True) -> None:
        self.enabled = enabled
        self.provider = crypten.mpc.get_default_provider()
        self.provider.tuple_cache = _TupleCache()
        self.provider.request_cache = []
        self.plans: OrderedDict[Hashable, list] = OrderedDict()
        self.fills = 0

    def run(self, signature: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, tracing its provider calls if this signature has no trace yet."""
        if not self.enabled:
            return compute()
        if signature in self.plans:
            self.plans.move_to_end(signature)
            return compute()
        self.provider.request_cache = []
        self.provider.trace(True)
        try:
            out = compute()
        finally:
            self.provider.trace(False)
            plan, self.provider.request_cache = self.provider.request_cache, []
        self.plans[signature] = plan
        while len(self.plans) > MAX_PLANS:
            self.plans.popitem(last=False)
        return out

    def refill(self, signature: Hashable) -> int:
        """Fetch one request's worth of tuples for ``signature``; how many were fetched."""
        plan = self.plans.get(signature)
        if not plan or not self.enabled:
            return 0
        if self.provider.tuple_cache.count() + len(plan) > MAX_CACHED:
            self.clear()
        self.provider.request_cache = plan
        try:
            self.provider.fill_cache()
        finally:
            self.provider.request_cache = []
        self.fills += 1
        return len(plan)

    def fingerprint(self) -> int:
        """Cached tuples left; equal on every party unless their caches went out of step."""
        return self.provider.tuple_cache.count()

    def clear(self) -> None:
        self.provider.tuple_cache = _TupleCache()
