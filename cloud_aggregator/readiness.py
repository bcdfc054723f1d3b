"""`GET /ready` of the party and the coordinator: whether this process can do its work now.

Orchestrators (Kubernetes readiness probes, load balancers) need an unauthenticated answer
by status code: 200 ready, 503 (the shared ErrorBody, reason ``not_ready``) not. ``/health`` answers 200 whenever the process serves
HTTP (the liveness probe); ``/ready`` also needs the state directory writable, since every
upload, round and aggregation is stored there before it is acknowledged. A full or
read-only volume then takes the service out of rotation without restarting it.

The party's MPC group is reported (``mpc``), not required: share uploads and FedAvg rounds
do not need it, and while one party's group (re)forms, which needs every other MPC host,
the others must keep taking uploads; inference then answers 503 ``mpc_unavailable`` itself.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from fastapi.responses import JSONResponse

from cloud_aggregator.web import error_response

log = logging.getLogger(__name__)

#: Prefix of the probe file written (and removed at once) in the state directory.
PROBE_PREFIX = ".ready-probe-"


def state_dir_problem(data_dir: Path) -> str | None:
    """None when a file can be created, written and removed in ``data_dir`` (created first if
    missing, as the service's first write would); else why not."""
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=data_dir)
    except OSError as err:
        return f"state directory {data_dir} is not writable: {err.strerror or err}"
    try:
        os.write(fd, b"r")
    except OSError as err:
        return f"state directory {data_dir} cannot be written: {err.strerror or err}"
    finally:
        os.close(fd)
        os.unlink(name)
    return None


class Readiness:
    """The ``/ready`` answer of one service; logs each change between ready and not ready once
    (a probe asks every few seconds)."""

    def __init__(self, service: str, data_dir: Path) -> None:
        self.service, self.data_dir = service, Path(data_dir)
        self._last: str | None = None  # the last problem reported, "" when ready

    def response(self, **extra) -> JSONResponse:
        """200 ``{"ready": true, ...extra}``, or 503 with the shared ErrorBody ``not_ready``."""
        problem = state_dir_problem(self.data_dir)
        if problem != self._last:
            if problem is None:
                log.info("%s is ready", self.service)
            else:
                log.warning("%s is not ready: %s", self.service, problem)
            self._last = problem
        if problem is None:
            return JSONResponse({"ready": True, **extra})
        return error_response(503, "not_ready", problem)
