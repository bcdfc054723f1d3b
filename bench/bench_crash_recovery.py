"""Crash recovery of secure aggregation: kill -9 one role mid-round, restart it or retry,
and compare the published global model with plaintext FedAvg.

Real processes on loopback TLS (2 parties + coordinator, as in the tests). Scenarios, each
on a fresh cluster with one round:

- ``party0`` / ``party1`` / ``coordinator``: SIGKILL after the first of 3 hospitals uploaded,
  restart it, the other hospitals upload (toy 620-parameter updates, FederatedClient);
- ``party1_during_upload``: party 1 SIGKILLed, a hospital uploads (party 0 stores its share,
  party 1 is unreachable), party 1 restarts, the same client retries and a second hospital
  retries from a fresh client (a new ``FederatedClient`` reading the kept bodies);
- ``edge_federate``: three real ``iomt edge federate`` processes (BYOD breast-cancer folders,
  the default multimodal model, 112k parameters) upload while party 1 is down; one edge is
  SIGKILLed while it waits to retry, party 1 restarts, that edge is re-run in a new process.

``restart_to_done_s``: from the restart (edge: of party 1) to the round's ``done``, including
the clients' retry backoff and, for the edge, a new process's start-up.

Reference: plaintext FedAvg in float64 of the states the hospitals shared (toy scenarios:
the states themselves; edge scenario: the updates decoded from the bodies each edge kept in
``DATA_DIR/federation``, the ones it committed to). Reported: max |global - reference|.

Run: python bench/bench_crash_recovery.py [--only NAME] [--json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_server.federation.client import FederationError  # noqa: E402
from protocols import fixedpoint  # noqa: E402
from protocols.aggregation_messages import upload_from_wire  # noqa: E402
from protocols.model_files import CoordinatorModelFile  # noqa: E402
from protocols.params import unflatten  # noqa: E402
from protocols.sharing import add_seed_into  # noqa: E402
from iomt.local_cloud import LocalCloud, toy_state  # noqa: E402
from iomt.supervisor import run_iomt, spawn_iomt, stop  # noqa: E402

COUNTS = {"h1": 40, "h2": 125, "h3": 7}


def _fedavg(states: dict, counts: dict) -> dict:
    total = sum(counts[h] for h in states)
    return {k: sum(counts[h] * s[k].astype(np.float64) for h, s in states.items()) / total
            for k in next(iter(states.values()))}


def _diff(model: dict, ref: dict) -> float:
    return float(max(np.abs(model[k].astype(np.float64) - ref[k]).max() for k in ref))


def _toy(root: Path, kill: str) -> dict:
    cluster = LocalCloud.secagg(root, 2, list(COUNTS), round_timeout=300.0).start()
    try:
        clients = {h: cluster.client(h) for h in COUNTS}
        for c in clients.values():
            c.register()
        cfg = cluster.wait_round(clients["h1"], 1, states=("open",)).config
        states = {h: toy_state(int(h[1:])) for h in COUNTS}
        clients["h1"].upload(cfg, states["h1"], COUNTS["h1"])
        t0 = time.perf_counter()
        if kill == "coordinator":
            cluster.kill_coordinator()
            cluster.start_coordinator()
        else:
            i = int(kill[-1])
            cluster.kill_party(i)
            cluster.start_party(i)
        for h in ("h2", "h3"):
            clients[h].upload(cfg, states[h], COUNTS[h])
        st = cluster.wait_round(clients["h1"], 1)
        recovery = time.perf_counter() - t0
        _, model = clients["h1"].fetch_global(1)
        return {"state": st.state, "participants": st.participants,
                "max_abs_diff": _diff(model, _fedavg(states, COUNTS)), "restart_to_done_s": round(recovery, 2)}
    finally:
        cluster.stop()


def _during_upload(root: Path) -> dict:
    cluster = LocalCloud.secagg(root, 2, list(COUNTS), round_timeout=300.0).start()
    try:
        clients = {h: cluster.client(h, state_dir=root / f"{h}-edge") for h in COUNTS}
        for c in clients.values():
            c.register()
        cfg = cluster.wait_round(clients["h1"], 1, states=("open",)).config
        states = {h: toy_state(int(h[1:])) for h in COUNTS}
        cluster.kill_party(1)
        failed = 0
        for h in ("h1", "h2"):
            try:
                clients[h].upload(cfg, states[h], COUNTS[h])
            except FederationError:
                failed += 1
        cluster.start_party(1)
        clients["h1"].upload(cfg, states["h1"], COUNTS["h1"])  # the same client retries
        clients["h2"].close()
        clients["h2"] = cluster.client("h2", state_dir=root / "h2-edge")
        clients["h2"].register()
        clients["h2"].upload(cfg, states["h2"], COUNTS["h2"])  # a fresh client resends the kept bodies
        clients["h3"].upload(cfg, states["h3"], COUNTS["h3"])
        st = cluster.wait_round(clients["h1"], 1)
        _, model = clients["h1"].fetch_global(1)
        return {"state": st.state, "participants": st.participants, "first_attempts_failed": failed,
                "excluded": st.excluded, "max_abs_diff": _diff(model, _fedavg(states, COUNTS))}
    finally:
        cluster.stop()


def _kept_update(edge_dir: Path) -> tuple[dict, int]:
    """The update an edge committed to: the sum of its kept bodies, decoded (n_k * theta_k, n_k)."""
    (folder,) = [p for p in (edge_dir / "federation").iterdir() if not p.name.startswith(".")]
    ups = [upload_from_wire((folder / f"party{i}.bin").read_bytes()) for i in range(2)]
    total = ups[0].share().copy()
    add_seed_into(total, bytes(ups[1].payload))
    return total, ups[0].header.n_samples


def _edge(root: Path) -> dict:
    run_iomt("experiment", "export-breast-cancer", "--out", str(root / "bc"))
    hospitals = ["hospital-00", "hospital-01", "hospital-02"]
    run_iomt("edge", "federate", "--write-model", str(root / "model.json"),
             "--data-dir", str(root / "bc" / hospitals[0]))
    model = CoordinatorModelFile.read(root / "model.json")
    spec = model.param_spec()
    dummy = {n: np.zeros(s, np.float32) for n, s in spec}
    cluster = LocalCloud.secagg(root, 2, hospitals, round_timeout=600.0, state=dummy,
                                model=model.model_dump(include={"arch", "config", "init_seed"}))
    cluster.start()
    edges = {}
    try:
        cluster.kill_party(1)  # down before any edge uploads: every edge stores at party 0, then retries

        def edge(h: str):
            return spawn_iomt("-v", "edge", "federate", "--data-dir", str(root / "bc" / h),
                              "--key-file", str(root / f"creds/keys/{h}.json"), "--coordinator", cluster.coord_url,
                              *cluster.client_tls_args(h), "--json", log=root / f"{h}.log")
        edges = {h: edge(h) for h in hospitals}
        victim = hospitals[0]
        share = cluster.party_dir(0) / "rounds/r000001" / f"{victim}.json"
        deadline = time.monotonic() + 300
        while not share.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{victim} never reached party 0; see {root}")
            time.sleep(0.2)
        time.sleep(1.0)  # it is now waiting to retry party 1
        stop(edges.pop(victim), sig=9)
        t0 = time.perf_counter()
        cluster.start_party(1)
        edges[victim] = edge(victim)  # a new process: finds its kept upload and resends it
        codes = {h: p.wait(600) for h, p in edges.items()}
        client = cluster.client(victim)
        st = cluster.wait_round(client, 1)
        recovery = time.perf_counter() - t0
        client.register()
        _, model_state = client.fetch_global(1)
        kept = {h: _kept_update(root / "bc" / h) for h in hospitals}
        total = sum(n for _, n in kept.values())
        ref = unflatten(fixedpoint.decode(sum(v for v, _ in kept.values()), total), spec)
        resent = "already shared; resending" in (root / f"{victim}.log").read_text()
        return {"state": st.state, "participants": st.participants, "exit_codes": codes,
                "victim_resent_kept_upload": resent, "max_abs_diff": _diff(model_state, ref),
                "restart_to_done_s": round(recovery, 2)}
    finally:
        for p in edges.values():
            stop(p)
        cluster.stop()


SCENARIOS = {"party0": lambda r: _toy(r, "party0"), "party1": lambda r: _toy(r, "party1"),
             "coordinator": lambda r: _toy(r, "coordinator"), "party1_during_upload": _during_upload,
             "edge_federate": _edge}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (logs)")
    args = parser.parse_args()
    results = {}
    for name in args.only or SCENARIOS:
        root = Path(tempfile.mkdtemp(prefix=f"crash-{name}-"))
        try:
            results[name] = SCENARIOS[name](root)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        if not args.json:
            print(f"{name:22s} {results[name]}", flush=True)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
