"""Drive a generated cohort through one publisher per device, in simulated time.

The publisher is passed in (:class:`Publisher`, made by a :data:`PublisherFactory`), so the
simulators depend only on ``protocols``; `iomt simulate` passes real device agents.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from typing import Callable, Protocol

from protocols.messages import ClinicalNote, EhrRecord, ImagingStudy, Message, SignalFrame
from protocols.topics import Topic
from simulators.cohort import SimPatient

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """What the simulator needs of a device: :class:`device_agent.DeviceAgent` is one."""

    def start(self) -> "Publisher": ...
    def publish(self, msg: Message, topic: Topic | None = None) -> object: ...
    def flush(self, timeout: float | None = None) -> bool: ...
    def close(self, flush_timeout: float | None = 10.0) -> None: ...
    @property
    def buffered(self) -> int: ...


#: ``factory(device_class, device_id, patient_id, streams)`` -> a publisher for that device.
PublisherFactory = Callable[[str, str, str, dict[str, float]], Publisher]


def publish_cohort(patients: list[SimPatient], make_publisher: PublisherFactory, hospital: str,
                   start_ts: float, realtime: bool = False, flush_timeout: float = 300.0) -> tuple[Counter, int]:
    """Publish every modality of ``patients``; returns (messages published per stream, unacknowledged)."""
    published: Counter = Counter()
    first = patients[0].devices if patients else {}
    needed = {"imaging": any(p.image is not None for p in patients), "ehr": any(p.ehr is not None for p in patients),
              "notes": any(p.note is not None for p in patients)}  # a replayed cohort has wearables only
    shared = {cls: make_publisher(cls, first[cls], "ward", streams)
              for cls, streams in (("imaging", {"study": 0.0}), ("ehr", {"record": 0.0}), ("notes", {"note": 0.0}))
              if first and needed[cls]}
    wearables = {p.patient_id: make_publisher("wearable", p.devices["wearable"], p.patient_id,
                                              {s: rate for s, (rate, _) in p.streams.items()})
                 for p in patients if p.streams}
    agents = list(shared.values()) + list(wearables.values())
    for agent in agents:
        agent.start()
    try:
        for p in patients:  # event-like modalities first: a study, a record and a note per patient
            if p.image is not None:
                shared["imaging"].publish(ImagingStudy(
                    device_id=p.devices["imaging"], patient_id=p.patient_id, modality="CR",
                    study_uid=f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, p.patient_id).int}", pixels=p.image,
                    pixel_spacing=(0.35, 0.35), acquired_ts=start_ts))
                published["study"] += 1
            if p.ehr is not None:
                shared["ehr"].publish(EhrRecord.from_bundle(p.ehr))
                published["record"] += 1
            if p.note is not None:
                shared["notes"].publish(ClinicalNote(patient_id=p.patient_id, note_id=f"{p.patient_id}-n1",
                                                     text=p.note, author_role="physician", ts=start_ts),
                                        topic=Topic(hospital, "notes", p.devices["notes"], "note"))
                published["note"] += 1
        seconds = max((int(x.shape[0] / rate) for p in patients for rate, x in p.streams.values()), default=0)
        wall0 = time.monotonic()
        for sec in range(seconds):
            for p in patients:
                agent = wearables.get(p.patient_id)
                for stream, (rate, x) in p.streams.items():
                    lo, hi = int(round(sec * rate)), int(round((sec + 1) * rate))
                    if hi > x.shape[0] or hi <= lo:
                        continue
                    agent.publish(SignalFrame(device_id=p.devices["wearable"], stream=stream, seq=sec,
                                              start_ts=start_ts + sec, sample_rate=rate, channels=x.shape[1],
                                              samples=x[lo:hi]))
                    published[stream] += 1
            if realtime:
                time.sleep(max(0.0, wall0 + sec + 1 - time.monotonic()))
        deadline = time.monotonic() + flush_timeout
        for agent in agents:
            agent.flush(max(0.1, deadline - time.monotonic()))
    finally:
        left = sum(a.buffered for a in agents)
        for agent in agents:
            agent.close(flush_timeout=0)
    if left:
        log.warning("%d messages were not acknowledged; they stay in the publishers' buffers", left)
    return published, left
