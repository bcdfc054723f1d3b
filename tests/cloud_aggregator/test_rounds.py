"""Whole rounds over real HTTPS on loopback: coordinator + party processes, hospital clients."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from scipy import stats

from cloud_aggregator.store import load_global_share
from protocols import fixedpoint as fp
from protocols.params import flatten, spec_of
from iomt.local_cloud import LocalCloud, toy_state

pytestmark = pytest.mark.integration

COUNTS = {"h1": 40, "h2": 125, "h3": 7}


def _upload(cluster, client, rnd=1, seed=None):
    hospital = client.hospital
    st = cluster.wait_round(client, rnd, states=("open",))
    state = toy_state(seed if seed is not None else int(hospital[1:]))
    client.upload(st.config, state, COUNTS[hospital])
    return client, state


def _plain_fedavg(states: dict, counts: dict) -> dict:
    total = sum(counts[h] for h in states)
    return {k: sum(counts[h] * s[k].astype(np.float64) for h, s in states.items()) / total
            for k in next(iter(states.values()))}


@pytest.mark.parametrize("parties", [2, 3])
def test_secure_aggregate_equals_plaintext_fedavg_and_parties_hold_only_noise(tmp_path, parties):
    cluster = LocalCloud.secagg(tmp_path, parties, list(COUNTS)).start()
    try:
        states, clients = {}, cluster.federated_clients()
        for h in COUNTS:
            client, states[h] = _upload(cluster, clients[h])
        st = cluster.wait_round(client, 1)
        assert st.state == "done", cluster.logs()
        assert st.participants == sorted(COUNTS) and st.denominator == sum(COUNTS.values())
        meta, model = client.fetch_global(1)
        plain = _plain_fedavg(states, COUNTS)
        for k in plain:
            assert np.abs(model[k] - plain[k]).max() <= 1e-4
        # What the parties hold: stored uploads and the aggregate share, all uniform-looking.
        spec = spec_of(states["h1"])
        encoded = {h: fp.encode(flatten(s, spec), scale_by=COUNTS[h]) for h, s in states.items()}
        for i in range(parties):
            pmeta, share = load_global_share(cluster.party_dir(i))
            assert pmeta.party_index == i and pmeta.participants == sorted(COUNTS)
            assert pmeta.model.arch == "toy" and pmeta.denominator == sum(COUNTS.values())
            vec = flatten(share, spec, dtype=np.int64)
            held = [vec]
            for h in COUNTS:
                raw = (cluster.party_dir(i) / "rounds/r000001" / f"{h}.share").read_bytes()
                if i == 0:
                    held.append(np.frombuffer(raw[-8 * vec.size:], "<i8"))
                else:  # parties j>0 hold a 32-byte seed plus a small header, never a vector
                    assert len(raw) < 1024
            for arr in held:
                top = (arr.view(np.uint64) >> np.uint64(59)).astype(np.int64)  # 32 bins
                assert stats.chisquare(np.bincount(top, minlength=32)).pvalue > 1e-4
                for enc in encoded.values():
                    assert np.mean(arr == enc) < 0.01
                assert np.abs(fp.decode(arr)).min() > 1e3 or np.median(np.abs(fp.decode(arr))) > 1e9
    finally:
        cluster.stop()


def test_dropout_hospital_excluded_consistently(tmp_path):
    cluster = LocalCloud.secagg(tmp_path, 3, list(COUNTS), round_timeout=6.0).start()
    try:
        states, clients = {}, cluster.federated_clients()  # h2 registers but never uploads: misses the deadline
        for h in ("h1", "h3"):
            client, states[h] = _upload(cluster, clients[h])
        st = cluster.wait_round(client, 1)
        assert st.state == "done", cluster.logs()
        assert st.participants == ["h1", "h3"]
        metas = [load_global_share(cluster.party_dir(i))[0] for i in range(3)]
        assert all(m.participants == ["h1", "h3"] for m in metas)
        counts = {h: COUNTS[h] for h in states}
        _, model = client.fetch_global(1)
        plain = _plain_fedavg(states, counts)
        assert all(np.abs(model[k] - plain[k]).max() <= 1e-4 for k in plain)
    finally:
        cluster.stop()


def test_party_killed_mid_round_resumes_with_nothing_lost(tmp_path):
    cluster = LocalCloud.secagg(tmp_path, 3, list(COUNTS), round_timeout=120.0).start()
    try:
        states, clients = {}, cluster.federated_clients()
        for h in ("h1", "h2"):
            client, states[h] = _upload(cluster, clients[h])
        cluster.kill_party(2)  # SIGKILL: no clean shutdown
        cluster.start_party(2)
        client, states["h3"] = _upload(cluster, clients["h3"])
        st = cluster.wait_round(client, 1)
        assert st.state == "done" and st.participants == sorted(COUNTS), cluster.logs()
        _, model = client.fetch_global(1)
        plain = _plain_fedavg(states, COUNTS)
        assert all(np.abs(model[k] - plain[k]).max() <= 1e-4 for k in plain)
    finally:
        cluster.stop()


def test_several_rounds_with_library_clients(tmp_path):
    """Each hospital runs FederatedClient.run in its own thread; every round builds on the last."""
    cluster = LocalCloud.secagg(tmp_path, 2, list(COUNTS), rounds=3).start()
    target = toy_state(99)
    results = {}

    def train_fn_for(h):
        def train_fn(global_state, cfg):
            base = global_state if global_state is not None else toy_state(cfg.init_seed)
            # one "local step" halfway towards a common target
            return {k: (v + 0.5 * (target[k] - v)).astype(np.float32) for k, v in base.items()}, COUNTS[h], {}
        return train_fn

    def run(h):
        c = cluster.client(h)
        results[h] = c.run(train_fn_for(h))
        results[h + "_final"] = c.fetch_global(results[h][1].latest_version)

    try:
        threads = [threading.Thread(target=run, args=(h,)) for h in COUNTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        records, status = results["h1"]
        assert status.finished and status.rounds_done == 3, cluster.logs()
        assert [r.round for r in records] == [1, 2, 3]
        meta, model = results["h1_final"]
        assert meta["version"] == 3
        err = max(np.abs(model[k] - target[k]).max() for k in target)
        start = max(np.abs(toy_state(7)[k] - target[k]).max() for k in target)
        assert err == pytest.approx(start / 8, rel=1e-3)  # three halvings
        assert results["h2_final"][0]["sha256"] == meta["sha256"]  # every hospital sees the same model
        assert json.loads((cluster.party_dir(0) / "global/LATEST").read_text()) == 3
    finally:
        cluster.stop()
