"""Errors of encrypted inference, each with a stable machine-readable reason."""
from __future__ import annotations

from protocols.errors import Refusal


class InferenceError(Refusal):
    """An inference request was refused or failed; ``reason`` says why (e.g. ``bad_shape``,
    ``party_unreachable``), ``detail`` is for people."""
