"""A retried upload resends the same sharing; parties holding different sharings of one
hospital, or a claim of 2**80 samples, never reach the global model (real processes)."""
from __future__ import annotations

import stat
import threading
import time

import httpx
import numpy as np
import pytest

from edge_server.federation.client import FederatedClient, FederationError
from protocols.aggregation_messages import RoundConfig, upload_from_wire, upload_to_wire
from protocols.auth import Signer, make_credentials
from protocols.params import spec_hash, spec_of
from iomt.local_cloud import LocalCloud, toy_state

COUNTS = {"h1": 40, "h2": 125, "h3": 7, "h4": 60}


def _plain_fedavg(states: dict, counts: dict) -> dict:
    total = sum(counts[h] for h in states)
    return {k: sum(counts[h] * s[k].astype(np.float64) for h, s in states.items()) / total
            for k in next(iter(states.values()))}


def _put(c, i, body, hospital):
    with httpx.Client(verify=c.client_tls(hospital)) as http:
        return http.put(f"{c.party_urls[i]}/rounds/1/share", content=body,
                        headers=c.signer(hospital).headers(f"party-{i}"))


def _get(c, url, audience):
    with httpx.Client(verify=c.client_tls("coordinator")) as http:
        return http.get(url, headers=c.signer("coordinator").headers(audience)).json()


@pytest.mark.integration
def test_retry_after_party_killed_inconsistent_sharing_and_huge_sample_count(tmp_path):
    # h1, h2, h4 register (the round closes once they are in); h3 only tries to upload
    cluster = LocalCloud.secagg(tmp_path, 2, list(COUNTS), round_timeout=300.0, min_hospitals=3).start()
    try:
        clients = {h: cluster.client(h) for h in ("h1", "h2")}
        clients["h4"] = cluster.client("h4", **({"state_dir": tmp_path / "h4-edge"} if _has_state_dir() else {}))
        for c in clients.values():
            c.register()
        cfg = cluster.wait_round(clients["h1"], 1, states=("open",)).config
        states = {h: toy_state(int(h[1:])) for h in COUNTS}

        # (c) 2**80 samples: refused by every party with a reason, counted
        for i, body in enumerate(clients["h1"].make_uploads(cfg, states["h3"], COUNTS["h3"])):
            up = upload_from_wire(body)
            huge = upload_to_wire(up.header.model_copy(update={"hospital": "h3", "n_samples": 2 ** 80}),
                                  bytes(up.payload))
            resp = _put(cluster, i, huge, "h3")
            assert resp.status_code == 400 and resp.json()["error"] == "too_many_samples", resp.text

        # (b) h2 hands party 0 and party 1 pieces of two different sharings
        first, second = (clients["h2"].make_uploads(cfg, states["h2"], COUNTS["h2"]) for _ in range(2))
        assert _put(cluster, 0, first[0], "h2").status_code == 200
        assert _put(cluster, 1, second[1], "h2").status_code == 200

        # (a) party 1 is SIGKILLed during h1's upload, after party 0 stored h1's share
        # (paused first, so that h1's request to it is in flight when it dies)
        cluster.pause_party(1)
        errors = []
        upload = threading.Thread(target=_upload_catching, args=(clients["h1"], cfg, states["h1"], errors))
        upload.start()
        _wait_file(cluster.party_dir(0) / "rounds/r000001/h1.json")
        cluster.kill_party(1)
        upload.join(60)
        assert len(errors) == 1 and isinstance(errors[0], (FederationError, httpx.HTTPError)), errors
        with pytest.raises((FederationError, httpx.HTTPError)):  # h4 uploads while party 1 is down
            clients["h4"].upload(cfg, states["h4"], COUNTS["h4"])
        held = (cluster.party_dir(0) / "rounds/r000001/h1.share").read_bytes()
        cluster.start_party(1)
        clients["h1"].upload(cfg, states["h1"], COUNTS["h1"])  # the same client retries
        # h4 retries from a fresh client (as a re-run of `iomt edge federate` would)
        clients["h4"].close()
        clients["h4"] = cluster.client("h4", state_dir=tmp_path / "h4-edge")
        clients["h4"].register()
        clients["h4"].upload(cfg, states["h4"], COUNTS["h4"])
        assert (cluster.party_dir(0) / "rounds/r000001/h1.share").read_bytes() == held

        st = cluster.wait_round(clients["h1"], 1)
        assert st.state == "done", cluster.logs()
        assert st.participants == ["h1", "h4"] and st.denominator == COUNTS["h1"] + COUNTS["h4"]
        assert "different sharings" in st.excluded["h2"]
        _, model = clients["h1"].fetch_global(1)
        plain = _plain_fedavg({h: states[h] for h in ("h1", "h4")}, COUNTS)
        assert max(np.abs(model[k] - plain[k]).max() for k in plain) <= 1e-4
        m = _get(cluster, f"{cluster.party_urls[0]}/metrics", "party-0")  # party 1's restarted: counters reset
        assert m["rejected_too_many_samples"] == 1 and m["uploads_repeated"] >= 2
        assert _get(cluster, f"{cluster.coord_url}/metrics", "coordinator")["inconsistent_upload"] >= 1
        assert "h2 excluded: parties hold different sharings" in (tmp_path / "coordinator.log").read_text()
        assert "claims 1208925819614629174706176 samples" in (tmp_path / "party-0.log").read_text()
    finally:
        for c in clients.values():
            c.close()
        cluster.stop()


def _upload_catching(client, cfg, state, errors):
    try:
        client.upload(cfg, state, COUNTS[client.hospital])
    except Exception as err:  # noqa: BLE001 - the test asserts what it was
        errors.append(err)


def _wait_file(path, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _has_state_dir() -> bool:
    import inspect
    return "state_dir" in inspect.signature(FederatedClient).parameters


def test_kept_upload_is_byte_identical_across_clients_and_private(tmp_path):
    make_credentials(tmp_path / "creds", ["h1"], 2)
    signer = Signer.from_file(tmp_path / "creds/keys/h1.json")
    state = toy_state(1)
    spec = spec_of(state)
    cfg = RoundConfig(round=3, version=3, deadline=1e12, parties=2, spec=[(k, list(s)) for k, s in spec],
                      spec_hash=spec_hash(spec), max_samples=100)
    one = FederatedClient(signer, "https://127.0.0.1:1", state_dir=tmp_path / "edge")
    bodies = one.prepare_uploads(cfg, state, 10)
    assert one.prepare_uploads(cfg, state, 10) == bodies
    two = FederatedClient(signer, "https://127.0.0.1:1", state_dir=tmp_path / "edge")  # a new process
    assert two.prepare_uploads(cfg, state, 10) == bodies
    ids = {upload_from_wire(b).header.sharing_id() for b in bodies}
    assert len(ids) == 1
    files = [p for p in (tmp_path / "edge").rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert stat.S_IMODE((tmp_path / "edge").stat().st_mode) == 0o700
    with pytest.raises(FederationError, match="different update"):
        two.prepare_uploads(cfg, toy_state(2), 10)
    with pytest.raises(FederationError, match="accepts 1..100 samples"):
        two.prepare_uploads(cfg.model_copy(update={"round": 4}), state, 101)
    # the next round forgets the previous round's bodies
    two.prepare_uploads(cfg.model_copy(update={"round": 4}), state, 10)
    assert [p.name[:7] for p in (tmp_path / "edge").iterdir()] == ["r000004"]
    one.close()
    two.close()
