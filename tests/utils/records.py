"""A real edge store filled with synthetic patients, for tests."""
from __future__ import annotations

import numpy as np

from protocols.schema import CONDITIONS
from simulators.records import NOTES


def write_store(data_dir, n: int, seed: int = 0, hospital: str = "h0") -> list[str]:
    """A real edge store at ``data_dir`` holding ``n`` patients' FHIR bundles and notes.

    Vital signs and note wording depend on the condition, so a model can learn from them.
    Returns the patient ids.
    """
    import json
    import time

    from edge_server.ingest.sqlite_store import SqliteStore
    from edge_server.ingest.store import Batch, DocumentRow
    from protocols.fhir import build_bundle
    from protocols.messages import ClinicalNote

    rng = np.random.default_rng(seed)
    now = time.time()
    docs, ids = [], []
    for i in range(n):
        label = i % len(CONDITIONS)
        pid = f"{hospital}-p{i:04d}"
        ids.append(pid)
        features = {"age": float(rng.normal(55, 10)), "sex": float(i % 2),
                    "heart_rate": float(rng.normal((75, 105, 85)[label], 8)),
                    "resp_rate": float(rng.normal((15, 16, 24)[label], 2)),
                    "spo2": float(rng.normal((97, 96, 91)[label], 1.5))}
        bundle = build_bundle(pid, features, CONDITIONS[label], ts=now)
        note = ClinicalNote(patient_id=pid, note_id=f"n{i}", text=str(rng.choice(NOTES[label])), ts=now)
        docs.append(DocumentRow("ehr", f"ehr-{pid}", "ehr-feed", "ehr", pid, now, json.dumps(bundle).encode()))
        docs.append(DocumentRow("note", f"note-{pid}", "notes", "note", pid, now, note.model_dump_json().encode()))
    with SqliteStore(data_dir) as store:
        store.set_meta("hospital", hospital)
        store.commit(Batch(documents=docs, received=len(docs)))
    return ids
