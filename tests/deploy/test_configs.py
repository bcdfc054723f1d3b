"""Every example in deploy/config loads into its role's settings class (they stay in sync with the code)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloud_aggregator.settings import CoordinatorSettings, PartySettings, TriplesSettings
from device_agent.settings import AgentSettings, BrokerSettings
from edge_server.ingest.settings import EdgeSettings, FederateSettings
from edge_server.web.settings import WebSettings
from protocols.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: /etc/iomt/<name>.toml -> the settings class its service loads it into
ROLES = {"party": PartySettings, "coordinator": CoordinatorSettings, "triples": TriplesSettings,
         "edge": EdgeSettings, "web": WebSettings, "federate": FederateSettings, "broker": BrokerSettings,
         "device": AgentSettings}
EXAMPLES = sorted((DEPLOY / "config").glob("*/*.toml"))


@pytest.fixture(autouse=True)
def _no_iomt_env(monkeypatch):
    for name in os.environ:
        if name.startswith("IOMT_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_loads(path):
    settings = load_settings(ROLES[path.stem], path)
    assert isinstance(settings, ROLES[path.stem])


def test_examples_cover_every_role_and_both_parties():
    by_role = {}
    for path in EXAMPLES:
        by_role.setdefault(path.stem, []).append(path.parent.name)
    assert set(by_role) == set(ROLES)
    assert [load_settings(PartySettings, DEPLOY / "config" / h / "party.toml").index
            for h in ("party-0", "party-1")] == [0, 1]
    assert len(by_role["edge"]) == len(by_role["broker"]) == len(by_role["web"]) == len(by_role["federate"]) == 2


def test_every_role_has_a_unit():
    units = {p.name for p in (DEPLOY / "systemd").glob("*.service")}
    for role in ROLES:
        assert f"iomt-{role}.service" in units, role
