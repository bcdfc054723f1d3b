"""JSON decoding for untrusted input: a nesting limit and a :class:`ProtocolError`
(``bad_json``) instead of a RecursionError traceback from the parser."""
from __future__ import annotations

import json
from typing import Any

from protocols.errors import ProtocolError

#: Deepest nesting of arrays and objects accepted (the deepest real message, an aggregation
#: request, has 5 levels).
MAX_JSON_DEPTH = 32


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children)
    return deepest


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python's extension, not RFC 8259


def loads(raw: str | bytes | bytearray, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses input nested deeper than ``max_depth`` or not JSON at all.

    Raises
    ------
    ProtocolError
        ``reason == "bad_json"``, with what is wrong in ``detail``.
    """
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except RecursionError as err:  # CPython's parser gives up near the interpreter's recursion limit
        raise ProtocolError("bad_json", f"nested deeper than {max_depth}") from err
    except ValueError as err:  # JSONDecodeError and undecodable bytes
        raise ProtocolError("bad_json", f"not JSON: {str(err)[:120]}") from err
    if json_depth(value) > max_depth:
        raise ProtocolError("bad_json", f"nested deeper than {max_depth}")
    return value
