"""The cloud services' HTTP boundary against real party and coordinator processes: bodies
bounded while they stream in, token lifetimes capped at the verifier, malformed claims,
path parameters and deep JSON answered 4xx with the shared ErrorBody, counted and logged,
and the services keep serving."""
from __future__ import annotations

import json

import httpx
import pytest

from protocols.auth import _b64e, make_credentials
from iomt.local_cloud import LocalCloud
from iomt.supervisor import free_port, run_iomt

pytestmark = pytest.mark.integration

UPLOAD_LIMIT = 1 << 20
BODY_LIMIT = 64 << 10


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    env = {"IOMT_PARTY_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT), "IOMT_PARTY_MAX_BODY_BYTES": str(BODY_LIMIT),
           "IOMT_COORD_MAX_BODY_BYTES": str(BODY_LIMIT)}
    services = LocalCloud.api(tmp_path_factory.mktemp("api"), env=env).start()
    yield services
    services.stop()


def _peak_rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _chunks(total: int, size: int = 1 << 20):
    block = b"\0" * size
    for _ in range(total // size):
        yield block


def _error(resp: httpx.Response) -> str:
    body = resp.json()
    assert set(body) == {"error", "detail"}, body  # the shared ErrorBody, nothing else
    return body["error"]


def test_chunked_upload_is_refused_while_it_streams(cloud):
    party = cloud.procs["party-0"]
    before = _peak_rss_kib(party.pid)
    resp = httpx.put(f"{cloud.party_urls[0]}/rounds/1/share", content=_chunks(48 << 20),
                     headers=cloud.signer("h1").headers("party-0"), timeout=120)
    assert resp.status_code == 413 and _error(resp) == "too_large"
    grown_mib = (_peak_rss_kib(party.pid) - before) / 1024
    assert grown_mib < 16, f"party grew {grown_mib:.0f} MiB on a 48 MiB body with a 1 MiB limit"
    # a declared Content-Length over the limit is refused before anything is read
    resp = httpx.put(f"{cloud.party_urls[0]}/rounds/1/share", content=b"\0" * (UPLOAD_LIMIT + 1),
                     headers=cloud.signer("h1").headers("party-0"))
    assert resp.status_code == 413 and _error(resp) == "too_large"
    assert cloud.metrics(cloud.party_urls[0], "party-0")["rejected_too_large"] >= 2
    assert "refused PUT /rounds/1/share: 413 too_large" in cloud.log("party-0")
    assert httpx.get(f"{cloud.party_urls[0]}/health").status_code == 200


def test_json_bodies_are_bounded_on_every_route(cloud):
    big = json.dumps({"pad": "x" * (2 * BODY_LIMIT)}).encode()
    resp = httpx.post(f"{cloud.party_urls[0]}/rounds/1/aggregate", content=_chunks(len(big), 4096),
                      headers={**cloud.signer("coordinator").headers("party-0"), "content-type": "application/json"})
    assert resp.status_code == 413 and _error(resp) == "too_large"
    resp = httpx.post(f"{cloud.coord_url}/hospitals/register", content=_chunks(4 * BODY_LIMIT, 4096),
                      headers=cloud.signer("h2").headers("coordinator"))
    assert resp.status_code == 413 and _error(resp) == "too_large"
    assert cloud.metrics(cloud.coord_url, "coordinator")["rejected_too_large"] >= 1


def test_token_lifetime_is_capped_at_the_verifier(cloud):
    h1 = cloud.signer("h1")
    url = f"{cloud.party_urls[0]}/global/latest/meta"
    ten_years = {"Authorization": f"Bearer {h1.token('party-0', ttl=10 * 365 * 86400)}"}
    resp = httpx.get(url, headers=ten_years)
    assert resp.status_code == 401 and "lifetime" in resp.json()["detail"]
    resp = httpx.get(f"{cloud.coord_url}/status", headers={"Authorization": f"Bearer {h1.token('coordinator', ttl=7200)}"})
    assert resp.status_code == 401 and "lifetime" in resp.json()["detail"]
    assert httpx.get(url, headers={"Authorization": f"Bearer {h1.token('party-0', ttl=600)}"}).status_code != 401


@pytest.mark.parametrize("sub", [["h1"], {"id": "h1"}, 7, "../h1"])
def test_malformed_claims_answer_401(cloud, sub):
    claims = {"sub": sub, "role": "hospital", "aud": "party-0", "iat": 1.0, "exp": 2.0, "nonce": "ab"}
    token = f"{_b64e(json.dumps(claims).encode())}.AAAA"
    for url in (f"{cloud.party_urls[0]}/global/latest/meta", f"{cloud.coord_url}/status"):
        resp = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 401 and _error(resp) == "unauthorized", resp.text
        assert "sub" in resp.json()["detail"]
    deep = f"{_b64e(b'[' * 700 + b']' * 700)}.AAAA"  # under the 2048-character cap
    assert httpx.get(f"{cloud.coord_url}/status", headers={"Authorization": f"Bearer {deep}"}).status_code == 401


@pytest.mark.parametrize("path", ["/global/abc/meta", "/global/1e3/share", "/global/-1/meta",
                                  "/rounds/0/receipts", "/rounds/99999999999999999999/receipts"])
def test_bad_path_parameters_answer_4xx(cloud, path):
    who = "coordinator" if "receipts" in path else "h1"
    resp = httpx.get(f"{cloud.party_urls[0]}{path}", headers=cloud.signer(who).headers("party-0"))
    assert 400 <= resp.status_code < 500 and _error(resp) == "invalid", resp.text
    resp = httpx.get(f"{cloud.coord_url}/rounds/abc", headers=cloud.signer("h1").headers("coordinator"))
    assert resp.status_code == 422 and _error(resp) == "invalid"


def test_deeply_nested_json_is_bad_input_not_a_traceback(cloud):
    headers = {**cloud.signer("coordinator").headers("party-0"), "content-type": "application/json"}
    forty_deep = b'{"config": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}"  # parses, but deeper than 32
    for body in (b"[" * 20000 + b"]" * 20000, forty_deep,
                 b"{not json"):
        resp = httpx.post(f"{cloud.party_urls[0]}/rounds/1/aggregate", content=body, headers=headers)
        assert resp.status_code == 400 and _error(resp) == "bad_json", resp.text
    assert cloud.metrics(cloud.party_urls[0], "party-0")["rejected_bad_json"] >= 3
    assert "Traceback" not in cloud.log("party-0") and cloud.alive()


def test_openapi_declares_the_error_answers(cloud):
    spec = httpx.get(f"{cloud.party_urls[0]}/openapi.json").json()
    upload = spec["paths"]["/rounds/{rnd}/share"]["put"]["responses"]
    assert {"401", "403", "409", "413"} <= set(upload)
    assert upload["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "404" in spec["paths"]["/global/{version}/meta"]["get"]["responses"]
    assert "413" in spec["paths"]["/inference/v1/predict"]["post"]["responses"]
    coord = httpx.get(f"{cloud.coord_url}/openapi.json").json()
    assert {"401", "403", "404"} <= set(coord["paths"]["/rounds/{rnd}"]["get"]["responses"])
    assert "HTTPValidationError" not in json.dumps(spec) + json.dumps(coord)  # one error body


def test_party_refuses_a_registry_with_an_id_that_is_not_plain(tmp_path):
    registry = make_credentials(tmp_path / "creds", ["h1"], 2)
    data = json.loads(registry.read_text())
    data["principals"]["../evil"] = data["principals"]["h1"]
    registry.write_text(json.dumps(data))
    proc = run_iomt("cloud", "party", "--index", "0", "--parties", "2", "--data-dir", str(tmp_path / "p0"),
                    "--listen", f"127.0.0.1:{free_port()}", "--registry", str(registry), "--insecure-http",
                    check=False, timeout=60)
    assert proc.returncode == 2 and "not a plain id" in proc.stderr
