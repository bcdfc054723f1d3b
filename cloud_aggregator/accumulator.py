"""Per-round running sums: a party adds each upload's share into an int64 accumulator as
the upload arrives (after it is durably stored), so closing a round is one final fix-up.

The accumulator remembers which hospitals it holds. At close the coordinator names the
participants; hospitals stored but not named (e.g. acknowledged by this party but not by
another one) are subtracted again, participants missing from the sum (an accumulation that
failed, or a party restarted mid-round: the accumulator is memory only) are added from the
stored uploads. So the result is always exactly the wrap-around sum of the participants'
stored shares, whatever happened before.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import numpy as np

from protocols.aggregation_messages import Upload

log = logging.getLogger(__name__)


class RoundAccumulator:
    """Running sums of shares, one per open round (this party's share of ``sum_k n_k theta_k``)."""

    def __init__(self) -> None:
        self._sums: dict[int, tuple[np.ndarray, set[str]]] = {}
        self._lock = threading.Lock()

    def add(self, rnd: int, upload: Upload) -> None:
        """Add one stored upload's share to round ``rnd``'s running sum."""
        h = upload.header
        with self._lock:
            acc, held = self._sums.get(rnd) or (None, set())
            if h.hospital in held:
                return
            if acc is None or acc.size != h.size:
                acc, held = np.zeros(h.size, dtype=np.int64), set()
            upload.add_into(acc)
            held.add(h.hospital)
            self._sums[rnd] = (acc, held)

    def held(self, rnd: int) -> set[str]:
        with self._lock:
            return set(self._sums.get(rnd, (None, set()))[1])

    def total(self, rnd: int, size: int, participants: Iterable[str],
              load: Callable[[str], Upload]) -> np.ndarray:
        """The exact sum of ``participants``' shares; takes the round's accumulator (forgets it)."""
        wanted = list(dict.fromkeys(participants))
        with self._lock:
            acc, held = self._sums.pop(rnd, (None, set()))
        if acc is None or acc.size != size:
            acc, held = np.zeros(size, dtype=np.int64), set()
        extra = sorted(held - set(wanted))
        missing = [p for p in wanted if p not in held]
        for hospital in extra:
            load(hospital).add_into(acc, subtract=True)
        for hospital in missing:
            load(hospital).add_into(acc)
        if extra or missing:
            log.info("round %d: close-time fix-up subtracted %d and added %d shares", rnd, len(extra), len(missing))
        return acc

    def forget_before(self, rnd: int) -> None:
        """Drop the sums of rounds older than ``rnd`` (they can no longer close)."""
        with self._lock:
            for r in [r for r in self._sums if r < rnd]:
                del self._sums[r]
