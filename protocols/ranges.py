"""The value ranges every decoded field must fit so that any store can hold it.

The edge stores what devices send in SQLite, whose INTEGER is signed 64-bit and whose TEXT
is UTF-8. A decoder that accepts a value outside those ranges hands the store a row it
cannot bind (``OverflowError``, ``UnicodeEncodeError``), so the decoders check them here,
at the protocol layer, and reject the message with a reason like any other bad payload.

* Integers that become columns (a frame's ``seq``) lie in ``[0, MAX_INT]``.
* Text (every JSON string and key, identifiers read from DICOM) is encodable as UTF-8:
  no lone UTF-16 surrogate, which JSON's ``\\ud800`` escape, a UTF-16 JSON text or the
  bytes ``ed a0 80`` (``json.loads`` decodes with ``surrogatepass``) would otherwise produce.
"""
from __future__ import annotations

from protocols.errors import ProtocolError

#: Largest integer a stored column holds: SQLite's INTEGER is a signed 64-bit value.
MAX_INT = 2**63 - 1


def encodable(text: str) -> bool:
    """Whether ``text`` has a UTF-8 encoding (no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(text: str, what: str) -> str:
    """``text`` unchanged; raises :class:`ProtocolError` ``bad_text`` when it is not UTF-8 encodable."""
    if not encodable(text):
        raise ProtocolError("bad_text", f"{what} holds a lone UTF-16 surrogate: {ascii(text)[:80]}")
    return text


def check_json_text(value: object) -> None:
    """Raise ``bad_text`` if any string or key anywhere in a parsed JSON value is not encodable.

    Iterative, so a deeply nested document cannot exhaust the stack here.
    """
    stack = [(value, "$")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            check_text(item, path)
        elif isinstance(item, dict):
            for key, sub in item.items():
                check_text(key, f"a key of {path}")
                stack.append((sub, f"{path}.{key}" if key.isascii() else f"{path}.?"))
        elif isinstance(item, list):
            stack.extend((sub, f"{path}[{i}]") for i, sub in enumerate(item))


def printable(text: object, limit: int | None = None) -> str:
    """``text`` with anything not UTF-8 encodable escaped, for log lines and rejection rows."""
    out = text if isinstance(text, str) else str(text)
    if not encodable(out):
        out = out.encode("utf-8", "backslashreplace").decode("utf-8")
    return out if limit is None else out[:limit]
