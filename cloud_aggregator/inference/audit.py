"""Append-only audit log of inference requests: who asked, when, for which model version.

Never the content: no share, shape-independent of the patient beyond the batch size.
One JSON object per line, flushed per request.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


class AuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()

    def record(self, client: str, request_id: str, model_version: int | None, status: str, batch: int | None) -> None:
        entry = {"time": time.time(), "client": client, "request_id": request_id,
                 "model_version": model_version, "status": status, "batch": batch}
        with self._lock, os.fdopen(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
