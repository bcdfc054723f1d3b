"""Errors of encrypted inference, each with a stable machine-readable code."""
from __future__ import annotations

from protocols.errors import IomtError


class InferenceError(IomtError):
    """An inference request failed; ``code`` says why (e.g. ``bad_shape``, ``party_unreachable``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
