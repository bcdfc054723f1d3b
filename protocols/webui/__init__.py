"""The look the system's pages share (the clinician's page at the edge, the operator's page at
the coordinator): one stylesheet, ``STATIC_DIR/base.css``, that each app serves itself (no CDN)."""
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"

__all__ = ["STATIC_DIR"]
