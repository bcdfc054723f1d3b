"""The MPC group's job definitions (cloud_aggregator.mpc.jobs) and its party settings (no MPC group needed)."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from cloud_aggregator.mpc import Job, JobHeader, JobKind, JobStatus, http_status
from cloud_aggregator.settings import PartySettings


def test_status_table_gives_each_agreement_code_one_reason():
    wires = [s.wire for s in JobStatus if s.wire is not None]
    assert len(wires) == len(set(wires)) and JobStatus.OK.wire == 0
    assert [JobStatus.from_wire(w) for w in range(6)] == [
        JobStatus.OK, JobStatus.MISSING_SHARE, JobStatus.BAD_SHAPE, JobStatus.NO_MODEL,
        JobStatus.CLIENT_MISMATCH, JobStatus.BAD_INPUT]
    assert JobStatus.from_wire(99) is JobStatus.BAD_INPUT


@pytest.mark.parametrize("reason, status", [("no_model", 404), ("missing_share", 409), ("timeout", 504),
                                            ("mpc_unavailable", 503), ("model_out_of_range", 422),
                                            ("bad_shape", 400), ("model_mismatch", 400)])
def test_http_status_of_each_refusal(reason, status):
    assert http_status(reason) == status


def test_header_of_an_inference_job_names_the_latest_version_only_when_the_job_names_none():
    asked = []

    def latest():
        asked.append(1)
        return 7

    job = Job("r1", "h1", None, {"x": np.zeros((2, 3))})
    header = JobHeader.for_job(job, latest)
    assert (header.kind, header.version, header.shapes) == (JobKind.INFER, 7, {"x": [2, 3]})
    assert JobHeader.for_job(Job("r2", "h1", 3, {}), latest).version == 3 and len(asked) == 1
    assert JobHeader.from_wire(header.to_wire()) == header  # crosses the group by broadcast_obj
    assert _builtin_only(header.to_wire())  # CrypTen's restricted unpickler refuses other classes


def _builtin_only(value) -> bool:
    if isinstance(value, dict):
        return type(value) is dict and all(type(k) is str and _builtin_only(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_builtin_only(v) for v in value)
    return type(value) in (str, int, float, bool, type(None))


def test_header_of_a_server_update_carries_its_public_parameters():
    job = Job("u", "coordinator", 4, {"sum": np.zeros(3)}, kind=JobKind.SERVER_UPDATE,
              params={"public": {"opt": "adam"}, "spec": []})
    header = JobHeader.for_job(job, lambda: None)
    assert (header.kind, header.id, header.public, header.shapes) == (JobKind.SERVER_UPDATE, "u", {"opt": "adam"}, None)
    assert JobHeader.from_wire(header.to_wire()) == header and _builtin_only(header.to_wire())


def _party(**kw) -> PartySettings:
    return PartySettings(index=0, parties=2, data_dir="d", registry="r", **kw)


def test_mpc_settings_read_the_party_prefix_and_the_older_iomt_mpc_names(monkeypatch):
    assert (_party().mpc_provider, _party().mpc_device, _party().mpc_request_timeout) == ("TTP", "cpu", 120.0)
    monkeypatch.setenv("IOMT_MPC_REQUEST_TIMEOUT", "900")  # as iomt.experiments.encrypted passes it
    monkeypatch.setenv("IOMT_MPC_PROVIDER", "TFP")
    assert (_party().mpc_provider, _party().mpc_request_timeout) == ("TFP", 900.0)
    monkeypatch.setenv("IOMT_PARTY_MPC_PROVIDER", "TTP")
    assert _party().mpc_provider == "TTP"
    assert _party(mpc_request_timeout=5).mpc_request_timeout == 5.0


def test_unknown_triples_provider_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("IOMT_MPC_PROVIDER", "ttp-typo")
    with pytest.raises(ValidationError, match="mpc_provider"):
        _party()
