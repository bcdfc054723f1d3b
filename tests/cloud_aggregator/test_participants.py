"""The coordinator's participant rule: one sharing id and one sample count at every party,
within the cap; everything else is left out with a reason (no processes needed)."""
from __future__ import annotations

import json

import pytest

from cloud_aggregator.coordinator import Coordinator
from cloud_aggregator.settings import CoordinatorSettings
from protocols.aggregation_messages import Receipt, Receipts
from protocols.auth import declare_max_samples, make_credentials

HOSPITALS = ["h1", "h2", "h3", "h4", "h5"]


@pytest.fixture
def coord(tmp_path):
    registry = make_credentials(tmp_path / "creds", HOSPITALS, 2)
    (tmp_path / "model.json").write_text(json.dumps({"spec": [["w", [3]]]}))
    settings = CoordinatorSettings(data_dir=tmp_path / "coord", registry=registry,
                                   key_file=tmp_path / "creds/keys/coordinator.json",
                                   party_urls=["https://a", "https://b"], model_file=tmp_path / "model.json",
                                   max_samples=1000)
    return Coordinator(settings), registry


def _receipts(party: int, rows: dict) -> Receipts:
    return Receipts(round=1, party_index=party, receipts=[
        Receipt(hospital=h, n_samples=n, sha256="0" * 64, commitment=c) for h, (n, c) in rows.items()])


def test_only_consistent_bounded_sharings_are_aggregated(coord):
    c, registry = coord
    declare_max_samples(registry, "h5", 50)
    p0 = _receipts(0, {"h1": (10, "a"), "h2": (20, "b"), "h3": (30, "c"), "h4": (2 ** 80, "d"), "h5": (60, "e")})
    p1 = _receipts(1, {"h1": (10, "a"), "h2": (20, "x"), "h3": (31, "c"), "h4": (2 ** 80, "d"), "h5": (60, "e")})
    participants, denominator, commitments, excluded = c._participants(1, [p0, p1])
    assert participants == ["h1"] and denominator == 10 and commitments == {"h1": "a"}
    assert "different sharings" in excluded["h2"] and "different sample counts" in excluded["h3"]
    assert "at most 1000" in excluded["h4"] and "at most 50" in excluded["h5"]
    assert c.counters["inconsistent_upload"] == 2 and c.counters["too_many_samples"] == 2
