"""Schemathesis against the OpenAPI of a real party and coordinator (uvicorn processes on
loopback), every case with a valid token so that it reaches the handlers: no crash, no 500,
only declared status codes, and no traceback in the services' logs. A few hundred cases here;
bench/fuzz_api.py runs thousands."""
from __future__ import annotations

import pytest

from bench.api_fuzz import fuzz_cloud
from iomt.local_cloud import LocalCloud

pytestmark = pytest.mark.integration


def test_schemathesis_finds_no_server_error(tmp_path):
    services = LocalCloud.api(tmp_path).start()
    try:
        results = fuzz_cloud(services, examples=20, seed=11)
        assert services.alive()
    finally:
        services.stop()
    for name, counts in results.items():
        assert counts.crashes == 0, (name, counts.server_errors[:5])
        assert not counts.server_errors, (name, counts.server_errors[:5])
        assert not counts.undeclared, (name, dict(counts.undeclared))
        assert any(400 <= s < 500 for s in counts.by_status) and 200 in counts.by_status
    for log in ("party-0", "party-1", "coordinator"):
        assert "Traceback" not in (tmp_path / f"{log}.log").read_text(errors="replace")
    assert sum(c.cases for c in results.values()) >= 200
