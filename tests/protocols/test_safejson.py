"""Untrusted JSON: deep nesting and garbage are a ProtocolError('bad_json'), never a traceback."""
from __future__ import annotations

import pytest

from protocols import safejson
from protocols.errors import ProtocolError


@pytest.mark.parametrize("raw", [b"[" * 100000 + b"]" * 100000, b"[" * 33 + b"]" * 33,
                                 b'{"a": ' * 40 + b"1" + b"}" * 40, b"{not json", b"\xff\xfe"])
def test_refused_as_bad_json(raw):
    with pytest.raises(ProtocolError) as err:
        safejson.loads(raw)
    assert err.value.reason == "bad_json"


def test_depth_limit_is_inclusive():
    assert safejson.loads(b"[" * 32 + b"]" * 32) == eval("[" * 31 + "[]" + "]" * 31)
    assert safejson.json_depth({"a": [1, {"b": []}]}) == 4 and safejson.json_depth(3) == 0
