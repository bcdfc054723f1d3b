"""Retrying a call to a service that may be down: exponential backoff with full jitter, bounded
by the total time spent waiting (Brooker, "Exponential Backoff And Jitter", AWS Architecture
Blog, 2015: full jitter spreads many clients that lost the same server)."""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class GaveUp(Exception):
    """Every try failed for longer than the policy allows; ``last`` is the last reason."""

    def __init__(self, what: str, waited_s: float, tries: int, last: str) -> None:
        super().__init__(f"{what}: gave up after {tries} tries over {waited_s:.0f}s; last: {last}")
        self.what, self.waited_s, self.tries, self.last = what, waited_s, tries, last


@dataclass(frozen=True)
class Backoff:
    """Wait ``uniform(0, min(max_s, first_s * 2**attempt))`` between tries, and give up once
    ``give_up_after_s`` have passed since the first failure (0: never retry)."""

    first_s: float = 1.0
    max_s: float = 30.0
    give_up_after_s: float = 600.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int) -> float:
        return self.rng.uniform(0.0, min(self.max_s, self.first_s * 2.0 ** min(attempt, 62)))

    def call(self, fn: Callable[[], T], transient: Callable[[BaseException], str | None], what: str,
             sleep: Callable[[float], None] = time.sleep) -> T:
        """``fn()``, tried again while ``transient(err)`` names a reason for the error it raised.

        Each retry is logged at WARNING with that reason; :class:`GaveUp` (from the last error)
        once the next wait would pass ``give_up_after_s``. Errors ``transient`` returns None for
        propagate at once.
        """
        start, attempt = time.monotonic(), 0
        while True:
            try:
                return fn()
            except Exception as err:
                reason = transient(err)
                if reason is None:
                    raise
                waited = time.monotonic() - start
                pause = self.delay(attempt)
                attempt += 1
                if waited + pause > self.give_up_after_s:
                    raise GaveUp(what, waited, attempt, reason) from err
                log.warning("%s: %s; retry %d in %.1fs (giving up after %.0fs)", what, reason, attempt, pause,
                            self.give_up_after_s)
                sleep(pause)
