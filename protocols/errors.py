"""The exception hierarchy shared by every package."""
from __future__ import annotations


class IomtError(Exception):
    """Base class of every error this system raises on purpose."""


class Refusal(IomtError):
    """Something this system refuses to do, for a stated reason.

    ``reason`` is a short machine-readable slug (a counter label and the ``error`` of an HTTP
    error body: ``bad_version``, ``replay``, ``round_closed`` ...); ``detail`` is for people.
    Every refusal names its reason this way.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ProtocolError(Refusal):
    """A message that cannot be decoded or fails validation."""


class TopicError(ProtocolError):
    """A topic that does not follow ``iomt/{hospital}/{device_class}/{device_id}/{stream}``."""

    def __init__(self, detail: str) -> None:
        super().__init__("bad_topic", detail)


class ShareError(ProtocolError):
    """A secret share that is truncated, of the wrong shape, version or ring."""


class ConfigError(IomtError):
    """Configuration that is missing, malformed or unsafe."""
