"""The clinician's step of `iomt demo`: one held-out patient, predicted in the clear at the
hospital (ONNX Runtime on the global model it reconstructed) and by encrypted inference in
the cloud (`iomt infer`), and the two answers compared."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from iomt.local_cloud import LocalCloud
from iomt.supervisor import ChildFailed, Supervisor, iomt_argv

MPC_READY_TIMEOUT_S = 300.0


def _json(name: str, stdout: str) -> dict:
    try:
        return json.loads(stdout)
    except ValueError as err:
        raise ChildFailed(f"{name} printed no JSON result: {stdout[-500:]!r}") from err


def _pick_patient(edge_dir: Path, seed: int) -> tuple[str, tuple[str, ...]]:
    """A held-out (test split) patient, preferring one with every modality."""
    from edge_server.dataset.records import load_records
    from edge_server.training import split_records

    _, _, test = split_records(load_records(edge_dir), seed=seed)
    best = max(test, key=lambda r: len(r.modalities()))
    return best.patient_id, best.modalities()


def clinician_inference(out: Path, hospital: str, edge_dir: Path, cloud: LocalCloud, seed: int, sup: Supervisor,
                        say: Callable[[str], None]) -> dict:
    key_file, party_urls = cloud.key_file(hospital), cloud.party_urls
    patient, modalities = _pick_patient(edge_dir, seed)
    say(f"clinician at {hospital} asks about held-out patient {patient} ({', '.join(modalities)})")
    plain = _json("iomt edge predict", sup.run("predict-plain", iomt_argv(
        "edge", "predict", "--data-dir", str(edge_dir), "--patient", patient, "--json")))
    cloud.wait_ready(MPC_READY_TIMEOUT_S)
    t0 = time.monotonic()
    enc = _json("iomt infer", sup.run("infer-encrypted", iomt_argv(
        "infer", "--patient", patient, "--data-dir", str(edge_dir), "--parties", ",".join(party_urls),
        "--key-file", str(key_file), *cloud.client_tls_args(hospital), "--json")))
    wall = time.monotonic() - t0
    p_plain = plain["probabilities"] if isinstance(plain["probabilities"], dict) else plain["probabilities"][0]
    p_enc = enc["probabilities"][0]
    diff = max(abs(p_plain[k] - p_enc[k]) for k in p_enc)
    same = max(p_plain, key=p_plain.get) == max(p_enc, key=p_enc.get)
    say(f"encrypted answer {enc['prediction'][0]} (plaintext {max(p_plain, key=p_plain.get)}), "
        f"max probability difference {diff:.4f}, {enc['rounds']} rounds, {wall:.1f}s")
    return {"hospital": hospital, "patient": patient, "modalities": list(modalities), "plaintext": plain,
            "encrypted": enc, "max_prob_diff": diff, "same_class": same, "client_wall_s": wall}
