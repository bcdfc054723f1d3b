"""One exception hierarchy: every error raised on purpose is an IomtError, every refusal a Refusal."""
from __future__ import annotations

import importlib

import pytest

from protocols.errors import IomtError, Refusal

REFUSALS = ["protocols.auth:AuthError", "cloud_aggregator.inference.errors:InferenceError",
            "edge_server.web.app:CloudError", "cloud_aggregator.party:RoundRefused",
            "cloud_aggregator.store:UploadRefused", "protocols.errors:ShareError"]
OTHER_ERRORS = ["edge_server.inference.query:QueryError", "edge_server.ingest.daemon:StoreFailed",
                "edge_server.dataset.text_embedding:TextEmbeddingUnavailable", "simulators.replay:ReplayError",
                "iomt.supervisor:ChildFailed", "cloud_aggregator.crypten_compat:CryptenCompatError"]


def _load(where: str) -> type:
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("where", REFUSALS)
def test_refusals_name_reason_and_detail(where):
    cls = _load(where)
    assert issubclass(cls, Refusal)
    err = cls("some_reason", "for people")
    assert (err.reason, err.detail, str(err)) == ("some_reason", "for people", "some_reason: for people")


@pytest.mark.parametrize("where", OTHER_ERRORS)
def test_other_errors_are_iomt_errors(where):
    cls = _load(where)
    assert issubclass(cls, IomtError) and not issubclass(cls, Refusal)


def test_query_error_is_still_a_value_error():
    """iomt infer and the edge web app catch ValueError around building a query."""
    assert issubclass(_load("edge_server.inference.query:QueryError"), ValueError)
