"""Seed-compressed n-party additive sharing, wire format and parameter flattening."""
import numpy as np
import pytest
from scipy import stats

from protocols import fixedpoint as fp
from protocols import sharing
from protocols.aggregation_messages import sharing_to_wire, upload_from_wire, upload_to_wire
from protocols.errors import ShareError
from protocols.params import flatten, spec_hash, spec_of, state_sha256, unflatten


def _expand_all(full, seeds):
    return [full] + [sharing.expand_seed(s, full.size) for s in seeds]


@pytest.mark.parametrize("parties", [2, 3, 5])
def test_shares_reconstruct_exactly(parties):
    x = fp.encode(np.random.default_rng(1).normal(size=1000))
    full, seeds = sharing.share(x, parties)
    assert len(seeds) == parties - 1 and all(len(s) == sharing.SEED_BYTES for s in seeds)
    assert np.array_equal(sharing.reconstruct(_expand_all(full, seeds)), x)


def test_seed_expansion_is_deterministic_and_seed_dependent():
    s1, s2 = sharing.new_seed(), sharing.new_seed()
    assert np.array_equal(sharing.expand_seed(s1, 64), sharing.expand_seed(s1, 64))
    assert not np.array_equal(sharing.expand_seed(s1, 64), sharing.expand_seed(s2, 64))
    assert np.array_equal(sharing.expand_seed(s1, 10), sharing.expand_seed(s1, 64)[:10])
    with pytest.raises(ShareError):
        sharing.expand_seed(b"short", 4)


@pytest.mark.parametrize("parties", [2, 3])
def test_weighted_fedavg_on_shares_matches_plaintext(parties):
    rng = np.random.default_rng(2)
    models = [rng.normal(0, 0.5, 2000) for _ in range(4)]
    counts = [17, 230, 5, 99]
    party_sums = [np.zeros(2000, np.int64) for _ in range(parties)]
    for theta, n in zip(models, counts):
        full, seeds = sharing.share(fp.encode(theta, scale_by=n), parties)
        for j, s in enumerate(_expand_all(full, seeds)):
            np.add(party_sums[j], s, out=party_sums[j])
    secure = fp.decode(sharing.reconstruct(party_sums), divisor=sum(counts))
    plain = sum(n * t for t, n in zip(models, counts)) / sum(counts)
    assert np.abs(secure - plain).max() <= 1e-4


def test_every_share_looks_uniform_even_for_a_constant_secret():
    x = fp.encode(np.full(20_000, 0.125))  # highly structured plaintext
    full, seeds = sharing.share(x, 3)
    for s in _expand_all(full, seeds):
        top = (s.view(np.uint64) >> np.uint64(56)).astype(np.int64)  # top byte: 256 bins
        chi = stats.chisquare(np.bincount(top, minlength=256))
        assert chi.pvalue > 1e-4
        assert not np.any(s == x[0])


def test_wire_round_trip_and_refusals():
    size = 12
    vec = np.arange(size, dtype=np.int64) - 5
    raw, seed_raw = sharing_to_wire(vec, [b"k" * 32], hospital="h1", round=1, n_samples=3, size=size,
                                    spec_hash="0" * 64)
    up = upload_from_wire(raw)
    head = up.header
    assert (head.party_index, head.kind, head.n_samples) == (0, "full", 3) and np.array_equal(up.share(), vec)
    for bad, reason in [(raw[:-8], "truncated"), (raw[:3], "truncated"), (b"XXXX" + raw[4:], "bad_magic"),
                        (raw[:4] + b"\x09" + raw[5:], "bad_version")]:
        with pytest.raises(ShareError) as err:
            upload_from_wire(bad)
        assert err.value.reason == reason
    seed_head = upload_from_wire(seed_raw).header
    assert seed_head.sharing_id() == head.sharing_id()  # one sharing, one id at every party
    assert upload_from_wire(seed_raw).share().shape == (size,)
    with pytest.raises(ShareError):
        upload_from_wire(upload_to_wire(seed_head, b"k" * 31))
    with pytest.raises(ShareError):  # party 0 must get the full share, not a seed
        upload_from_wire(upload_to_wire(head.model_copy(update={"kind": "seed"}), b"k" * 32))


def test_commitments_bind_each_payload_and_name_one_sharing():
    size = 8
    vec = np.arange(size, dtype=np.int64)
    a = sharing_to_wire(vec, [b"a" * 32, b"b" * 32], hospital="h1", round=2, n_samples=5, size=size,
                        spec_hash="0" * 64)
    b = sharing_to_wire(vec, [b"a" * 32, b"b" * 32], hospital="h1", round=2, n_samples=5, size=size,
                        spec_hash="0" * 64)
    ids_a = {upload_from_wire(x).header.sharing_id() for x in a}
    assert len(ids_a) == 1 and ids_a.isdisjoint({upload_from_wire(x).header.sharing_id() for x in b})
    head = upload_from_wire(a[1]).header
    with pytest.raises(ShareError) as err:  # another payload under this header's commitment
        upload_from_wire(upload_to_wire(head, b"c" * 32))
    assert err.value.reason == "bad_commitment"
    with pytest.raises(ShareError) as err:  # a header whose nonce opens someone else's commitment
        upload_from_wire(upload_to_wire(head.model_copy(update={"nonce": upload_from_wire(a[2]).header.nonce}),
                                        b"b" * 32))
    assert err.value.reason == "bad_commitment"
    # the sample count is part of the sharing id: parties told different counts disagree on it
    assert head.model_copy(update={"n_samples": 6}).sharing_id() != head.sharing_id()


def test_params_flatten_unflatten_and_hash():
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    spec = spec_of(state)
    vec = flatten(state, spec)
    back = unflatten(vec, spec)
    assert all(np.array_equal(back[k], state[k]) for k in state)
    assert state_sha256(state) == state_sha256({k: v.copy() for k, v in state.items()})
    assert state_sha256(state) != state_sha256({**state, "b": np.zeros(3, np.float32)})
    assert spec_hash(spec) != spec_hash([("w", (3, 2)), ("b", (3,))])
    with pytest.raises(ShareError):
        flatten({"w": np.zeros((3, 2)), "b": np.ones(3)}, spec)
    with pytest.raises(ShareError):
        unflatten(vec[:-1], spec)
