"""Logging helpers: payloads are truncated before they reach a log line."""
from __future__ import annotations

MAX_LOGGED = 80


def clip(value: object, limit: int = MAX_LOGGED) -> str:
    """A printable, bounded rendering of ``value`` for log lines."""
    text = value.hex() if isinstance(value, (bytes, bytearray, memoryview)) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
