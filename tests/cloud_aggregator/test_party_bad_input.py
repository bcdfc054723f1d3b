"""Bad input and bad credentials against real party/coordinator processes: each gets a
clear 4xx, a counter and a log line, nothing is stored, and the service keeps serving.

Two clouds, so that no test depends on another having run (or not) before it:
``cluster`` keeps round 1 open all along (h2 never uploads a valid share there, so the round
never closes); bad input comes from h3, which never uploads validly there, and the one valid
upload from h1. ``finished`` has round 1 done (h1 and h2 upload in the fixture) for the
late-upload and revocation tests, which use h3 and h4 respectively.
"""
from __future__ import annotations


import httpx
import pytest

from protocols.aggregation_messages import UploadHeader, upload_to_wire
from protocols.auth import Signer, declare_max_samples, make_credentials, revoke
from protocols.pki import issue_local
from iomt.local_cloud import LocalCloud, toy_state

pytestmark = pytest.mark.integration

HOSPITALS = ["h1", "h2", "h3", "h4"]


def _start(root):
    c = LocalCloud.secagg(root, 2, HOSPITALS, round_timeout=600.0, min_hospitals=2).start()
    clients = {h: c.client(h) for h in HOSPITALS}
    clients["h1"].register()
    clients["h2"].register()  # round 1 opens expecting h1 and h2; h3 and h4 register later, if at all
    cfg = c.wait_round(clients["h1"], 1, states=("open",)).config
    return c, clients, cfg


def _stop(c, clients):
    for cl in clients.values():
        cl.close()
    c.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Round 1 open, and it stays open: h2 never uploads a valid share."""
    c, clients, cfg = _start(tmp_path_factory.mktemp("badinput"))
    yield c, clients, cfg
    _stop(c, clients)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Round 1 done with h1 and h2; h3 and h4 not registered."""
    c, clients, cfg = _start(tmp_path_factory.mktemp("finished"))
    try:
        for h, seed in (("h1", 1), ("h2", 2)):
            clients[h].upload(cfg, toy_state(seed), 5)
        assert c.wait_round(clients["h1"], 1).state == "done", c.logs()
        yield c, clients, cfg
    finally:
        _stop(c, clients)


def _put(c, i, body, signer, rnd=1, audience=None):
    headers = signer.headers(audience or f"party-{i}") if signer else {}
    with httpx.Client(verify=c.client_tls(signer.principal if signer else "h3")) as http:  # its own certificate
        return http.put(f"{c.party_urls[i]}/rounds/{rnd}/share", content=body, headers=headers)


def _receipts(c, i):
    with httpx.Client(verify=c.client_tls("coordinator")) as http:
        r = http.get(f"{c.party_urls[i]}/rounds/1/receipts", headers=c.signer("coordinator").headers(f"party-{i}"))
    return {x["hospital"] for x in r.json()["receipts"]}


def _metrics(c, i):
    with httpx.Client(verify=c.client_tls("coordinator")) as http:
        return http.get(f"{c.party_urls[i]}/metrics", headers=c.signer("coordinator").headers(f"party-{i}")).json()


def _bodies(clients, cfg, hospital="h3", n=10):
    return clients[hospital].make_uploads(cfg, toy_state(1), n)


def test_truncated_share_is_refused_and_nothing_stored(cluster):
    c, clients, cfg = cluster
    body = _bodies(clients, cfg)[0]
    resp = _put(c, 0, body[:-100], c.signer("h3"))
    assert resp.status_code == 400 and resp.json()["error"] == "truncated"
    assert "h3" not in _receipts(c, 0)
    assert _metrics(c, 0)["rejected_truncated"] >= 1


def test_wrong_shape_and_wire_version_are_refused(cluster):
    c, clients, cfg = cluster
    wrong = toy_state(1, shape=(20, 20))
    spec = [(k, list(v.shape)) for k, v in wrong.items()]
    bad_cfg = cfg.model_copy(update={"spec": spec})
    resp = _put(c, 0, clients["h3"].make_uploads(bad_cfg, wrong, 10)[0], c.signer("h3"))
    assert resp.status_code == 400 and resp.json()["error"] == "wrong_shape"
    body = bytearray(_bodies(clients, cfg)[1])
    body[4] = 7  # wire version byte
    resp = _put(c, 1, bytes(body), c.signer("h3"))
    assert resp.status_code == 400 and resp.json()["error"] == "bad_version"
    # a seed sent to party 0 (wrong party) is refused too
    resp = _put(c, 0, _bodies(clients, cfg)[1], c.signer("h3"))
    assert resp.status_code == 400 and resp.json()["error"] == "wrong_party"
    assert "h3" not in _receipts(c, 0) and "h3" not in _receipts(c, 1)


def test_bad_credentials_are_refused_and_counted(cluster, tmp_path):
    c, clients, cfg = cluster
    body = _bodies(clients, cfg)[0]
    before = _metrics(c, 0)
    assert _put(c, 0, body, None).status_code == 401  # no token
    outsider = make_credentials(tmp_path, ["h3", "mallory"], 0)  # keys unknown to the registry
    forged = Signer.from_file(outsider.parent / "keys" / "h3.json")
    assert _put(c, 0, body, forged).status_code == 401  # a registered name, the wrong key
    mallory = Signer.from_file(outsider.parent / "keys" / "mallory.json")
    c.tls_hosts.update(issue_local(c.root / "tls", [("mallory", "hospital")])[1])  # a certificate, no registry entry
    assert _put(c, 0, body, mallory).status_code == 401  # an unknown hospital
    assert _put(c, 0, body, c.signer("h3"), audience="party-1").status_code == 401  # token for another party
    assert _put(c, 0, body, c.signer("h2")).status_code == 403  # h2's token, h3's upload
    assert _put(c, 0, body, c.signer("party-1")).status_code == 403  # a party is not a hospital
    after = _metrics(c, 0)
    assert after["auth_rejected_401"] - before.get("auth_rejected_401", 0) == 4
    assert after["auth_rejected_403"] - before.get("auth_rejected_403", 0) >= 1
    assert "h3" not in _receipts(c, 0)
    log = (c.root / "party-0.log").read_text()
    assert "bad signature" in log and "unknown principal 'mallory'" in log
    assert "refused PUT /rounds/1/share" in log


def test_valid_upload_after_bad_ones_then_resend_repeats_and_replay_refused(cluster):
    c, clients, cfg = cluster
    bodies = _bodies(clients, cfg, hospital="h1")
    acks = [_put(c, i, body, c.signer("h1")) for i, body in enumerate(bodies)]
    assert [a.status_code for a in acks] == [200, 200] and acks[0].json()["stored"]
    assert acks[0].json()["commitment"] == acks[1].json()["commitment"]  # one sharing at both parties
    assert "h1" in _receipts(c, 0) and "h1" in _receipts(c, 1)
    first = (c.party_dir(0) / "rounds/r000001/h1.share").read_bytes()
    again = _put(c, 0, bodies[0], c.signer("h1"))  # the same bytes: a retry, answered as before
    assert again.status_code == 200 and not again.json()["stored"]
    assert again.json()["sha256"] == acks[0].json()["sha256"]
    replay = _put(c, 0, _bodies(clients, cfg, hospital="h1")[0], c.signer("h1"))  # a different sharing: refused
    assert replay.status_code == 409 and replay.json()["error"] == "replay"
    assert (c.party_dir(0) / "rounds/r000001/h1.share").read_bytes() == first  # original kept
    forged = bytearray(_bodies(clients, cfg, hospital="h2")[1])
    forged[-1] ^= 1  # a seed that does not open its commitment
    resp = _put(c, 1, bytes(forged), c.signer("h2"))
    assert resp.status_code == 400 and resp.json()["error"] == "bad_commitment"
    assert "h2" not in _receipts(c, 1)
    m = _metrics(c, 0)
    assert m["uploads_repeated"] >= 1 and m["rejected_replay"] >= 1


def test_sample_count_above_the_registry_declaration_is_refused(cluster):
    c, clients, cfg = cluster
    declare_max_samples(c.registry, "h3", 4)  # re-read by the running party
    try:
        resp = _put(c, 0, clients["h3"].make_uploads(cfg, toy_state(3), 5)[0], c.signer("h3"))
        assert resp.status_code == 400 and resp.json()["error"] == "too_many_samples"
        assert "at most 4" in resp.json()["detail"] and "h3" not in _receipts(c, 0)
    finally:
        declare_max_samples(c.registry, "h3", None)


def test_unknown_round_and_stale_round_are_refused(finished):
    c, clients, cfg = finished
    future = cfg.model_copy(update={"round": 9})
    resp = _put(c, 0, clients["h2"].make_uploads(future, toy_state(2), 5)[0], c.signer("h2"), rnd=9)
    assert resp.status_code == 409 and resp.json()["error"] == "unknown_round"
    # round 1 is done (h1 and h2): a late upload for it is stale
    clients["h3"].register()
    resp = _put(c, 0, clients["h3"].make_uploads(cfg, toy_state(3), 5)[0], c.signer("h3"))
    assert resp.status_code == 409 and resp.json()["error"] == "round_closed"


def test_revoked_hospital_cannot_upload_or_fetch(finished):
    c, clients, cfg = finished
    clients["h4"].register()
    assert clients["h4"].fetch_global(1)[0]["version"] == 1  # registered: may fetch
    revoke(c.registry, "h4")
    with httpx.Client(verify=c.client_tls("h4")) as http:
        resp = http.get(f"{c.party_urls[0]}/global/1/share", headers=c.signer("h4").headers("party-0"))
        assert resp.status_code == 403
        resp = http.get(f"{c.party_urls[0]}/global/1/share")
        assert resp.status_code == 401
        resp = http.post(f"{c.coord_url}/hospitals/register", headers=c.signer("h4").headers("coordinator"))
        assert resp.status_code == 403
    assert "revoked" in (c.root / "party-0.log").read_text()
