"""Fixed-point encoding in Z_2^64 with 16 fractional bits."""
import numpy as np
import pytest

from protocols import fixedpoint as fp
from protocols.errors import ShareError


def test_round_trip_error_is_half_an_ulp():
    x = np.random.default_rng(0).normal(0, 3, 10_000)
    err = np.abs(fp.decode(fp.encode(x)) - x)
    assert err.max() <= 0.5 / fp.SCALE + 1e-12


def test_matches_crypten_scale():
    # CrypTen's FixedPointEncoder uses base 2, precision 16: 1.0 -> 65536.
    assert fp.encode(np.array([1.0, -0.5]))[0] == 65536
    assert fp.encode(np.array([1.0, -0.5]))[1] == -32768
    assert fp.encode(np.array([1.0])).dtype == np.int64


def test_scale_by_encodes_weighted_value_and_decode_divides():
    x = np.array([0.25, -1.5, 3.0])
    enc = fp.encode(x, scale_by=40)
    np.testing.assert_allclose(fp.decode(enc, divisor=40), x, atol=1e-6)


def test_sum_wraps_like_the_ring():
    # adding uniformly random masks and removing them again wraps mod 2^64 without loss
    x = fp.encode(np.array([1.25, -7.0]))
    mask = np.array([np.iinfo(np.int64).max, np.iinfo(np.int64).min + 3], dtype=np.int64)
    with np.errstate(over="ignore"):
        assert np.array_equal((x + mask) - mask, x)


@pytest.mark.parametrize("bad", [np.array([np.nan]), np.array([np.inf]), np.array([fp.MAX_ABS * 2])])
def test_refuses_unencodable_values(bad):
    with pytest.raises(ShareError):
        fp.encode(bad)


def test_decode_refuses_floats():
    with pytest.raises(ShareError):
        fp.decode(np.array([1.0]))
