"""Drive a generated cohort through real device agents: one agent per device, simulated time."""
from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from device_agent.agent import DeviceAgent
from device_agent.settings import AgentSettings
from protocols.messages import ClinicalNote, EhrRecord, ImagingStudy, SignalFrame
from protocols.topics import Topic
from simulators.cohort import SimPatient

log = logging.getLogger(__name__)


def _agent(broker: str, hospital: str, device_class: str, device_id: str, patient_id: str,
           streams: dict[str, float], buffer_dir: Path, mqtt_version: str) -> DeviceAgent:
    return DeviceAgent(AgentSettings(
        broker=broker, hospital=hospital, device_class=device_class, device_id=device_id,
        patient_id=patient_id, streams=streams, buffer_path=buffer_dir / f"{device_id}.sqlite",
        mqtt_version=mqtt_version, model=f"sim-{device_class}", manufacturer="iomt-simulator"))


def publish_cohort(patients: list[SimPatient], hospital: str, broker: str, start_ts: float,
                   realtime: bool = False, buffer_dir: Path | None = None, mqtt_version: str = "3.1.1",
                   flush_timeout: float = 300.0) -> tuple[Counter, int]:
    """Publish every modality of ``patients``; returns (messages published per stream, unacknowledged)."""
    buffer_dir = Path(buffer_dir or tempfile.mkdtemp(prefix="iomt-sim-"))
    published: Counter = Counter()
    first = patients[0].devices if patients else {}
    needed = {"imaging": any(p.image is not None for p in patients), "ehr": any(p.ehr is not None for p in patients),
              "notes": any(p.note is not None for p in patients)}  # a replayed cohort has wearables only
    shared = {cls: _agent(broker, hospital, cls, first[cls], "ward", streams, buffer_dir, mqtt_version)
              for cls, streams in (("imaging", {"study": 0.0}), ("ehr", {"record": 0.0}), ("notes", {"note": 0.0}))
              if first and needed[cls]}
    wearables = {p.patient_id: _agent(broker, hospital, "wearable", p.devices["wearable"], p.patient_id,
                                      {s: rate for s, (rate, _) in p.streams.items()}, buffer_dir, mqtt_version)
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
        log.warning("%d messages were not acknowledged; they stay in %s", left, buffer_dir)
    return published, left
