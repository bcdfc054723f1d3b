"""Token verification: typed claims, a lifetime capped by the verifier, plain principal ids."""
from __future__ import annotations

import json

import pytest

from protocols.auth import (CLOCK_SKEW_S, AuthError, Registry, Signer, _b64e, check_principal_id,
                            make_credentials)
from protocols.errors import ConfigError, Refusal


@pytest.fixture
def fed(tmp_path):
    registry = make_credentials(tmp_path, ["h1"], 2)
    return Registry(registry, max_ttl=600), Signer.from_file(tmp_path / "keys" / "h1.json")


def test_lifetime_is_capped_whatever_the_token_says(fed):
    registry, h1 = fed
    assert registry.verify(h1.token("party-0", ttl=600 + CLOCK_SKEW_S), "party-0", ("hospital",)).sub == "h1"
    for ttl in (600 + CLOCK_SKEW_S + 1, 10 * 365 * 86400, -5):
        with pytest.raises(AuthError, match="lifetime") as err:
            registry.verify(h1.token("party-0", ttl=ttl), "party-0", ("hospital",))
        assert err.value.status == 401


@pytest.mark.parametrize("claims", [
    {"sub": ["h1"]}, {"sub": {"a": 1}}, {"sub": None}, {"sub": "../h1"}, {"role": "admin"},
    {"iat": "now"}, {"exp": [1]}, {"nonce": {"x": 1}}, {"extra": 1}])
def test_malformed_claims_are_401(fed, claims):
    registry, _ = fed
    base = {"sub": "h1", "role": "hospital", "aud": "party-0", "iat": 1.0, "exp": 2.0, "nonce": "ab"}
    token = f"{_b64e(json.dumps({**base, **claims}).encode())}.AAAA"
    with pytest.raises(AuthError, match="malformed") as err:
        registry.verify(token, "party-0", ("hospital",))
    assert err.value.status == 401


@pytest.mark.parametrize("token", ["", "a.b.c", "!!!.AAAA", "é.AAAA", f"{_b64e(b'[' * 700 + b']' * 700)}.AA",
                                   "x" * 5000, f"{_b64e(b'{' * 10)}.AA"])
def test_garbage_tokens_are_401(fed, token):
    registry, _ = fed
    with pytest.raises(AuthError) as err:
        registry.verify(token, "party-0", ("hospital",))
    assert err.value.status == 401


def test_refusals_name_a_slug_reason_and_keep_the_text_apart(fed):
    registry, h1 = fed
    token = h1.token("party-0")
    cases = [(lambda: registry.verify_header(None, "party-0", ("hospital",)), "missing_token", 401),
             (lambda: registry.verify(token, "party-1", ("hospital",)), "wrong_audience", 401),
             (lambda: registry.verify(token, "party-0", ("party",)), "wrong_role", 403),
             (lambda: registry.verify(token[:-4] + "AAAA", "party-0", ("hospital",)), "bad_signature", 401),
             (lambda: registry.verify("x.AA", "party-0", ("hospital",)), "malformed_token", 401)]
    for call, reason, status in cases:
        with pytest.raises(AuthError) as err:
            call()
        assert isinstance(err.value, Refusal)
        assert (err.value.reason, err.value.status) == (reason, status)
        assert err.value.detail and " " in err.value.detail  # the text for people
        assert err.value.http_error == ("unauthorized" if status == 401 else "forbidden")


def test_principal_ids_are_plain():
    for good in ("h1", "St-Mary_2.east", "party-0", "x" * 64):
        assert check_principal_id(good) == good
    for bad in ("../x", "a/b", "..", "h..1", "", ".h", "-h", "x" * 65, "h 1", ["h1"], None):
        with pytest.raises(ValueError):
            check_principal_id(bad)


def test_registry_with_a_bad_id_is_refused_and_a_bad_edit_keeps_the_last_good(tmp_path, fed):
    registry_path = tmp_path / "registry.json"
    data = json.loads(registry_path.read_text())
    good = Registry(registry_path)
    bad = dict(data, principals={**data["principals"], "../evil": data["principals"]["h1"]})
    registry_path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError):
        Registry(registry_path)
    h1 = Signer.from_file(tmp_path / "keys" / "h1.json")
    assert good.verify(h1.token("party-0"), "party-0", ("hospital",)).sub == "h1"  # last good kept
