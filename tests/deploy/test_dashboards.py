"""deploy/grafana and deploy/prometheus stay in step with the code: every metric a dashboard
queries is one the services export, the datasource the dashboards name is the provisioned one,
and the scrape configurations are valid YAML whose targets are the hosts and metrics ports of
the deploy/config examples."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from cloud_aggregator.metrics import CoordinatorMetrics, PartyMetrics
from cloud_aggregator.settings import CoordinatorSettings, PartySettings
from edge_server.ingest.metrics import EdgeMetrics
from edge_server.ingest.settings import EdgeSettings
from protocols.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
#: Prometheus' own series a dashboard may use besides the services' (target health).
BUILTIN = {"up"}
#: What each exposition type adds to a family's name (prometheus_client strips ``_total``).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"), "info": ("_info",)}


@pytest.fixture(autouse=True)
def _no_iomt_env(monkeypatch):
    for name in os.environ:
        if name.startswith("IOMT_"):
            monkeypatch.delenv(name)


def exported_names(tmp_path: Path) -> set[str]:
    """Every series name the party, the coordinator and the edge (with a ledger) can export."""
    (tmp_path / "privacy_accountant.json").write_text(json.dumps(
        {"delta": 1e-5, "unit": "patient", "rounds": [], "epsilon": 0.0, "epsilon_budget": 8.0}))
    (tmp_path / "federation" / "r000001-x").mkdir(parents=True)
    names = set()
    for registry in (PartyMetrics(2).registry, CoordinatorMetrics(2).registry,
                     EdgeMetrics(tmp_path, "h").registry):
        for family in registry.collect():
            names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
            names.update(s.name for s in family.samples)
    return names


def _exprs(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "expr" and isinstance(v, str)] + \
            [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def _metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers not followed by ``(`` (functions), not
    inside ``{...}`` or after ``by``/``without`` (labels), not in quotes, not PromQL keywords."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    return {n for n in names if n not in {"and", "or", "unless", "bool", "offset"} and not n.isdigit()}


def test_the_hospital_and_cloud_dashboards_exist():
    assert {p.name for p in DASHBOARDS} == {"hospital.json", "cloud.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_a_dashboard_queries_is_exported(path, tmp_path):
    board = json.loads(path.read_text())
    exported = exported_names(tmp_path)
    exprs = _exprs(board["panels"])
    used = set().union(*map(_metric_names, exprs))

    assert exprs and all(p.get("targets") for p in board["panels"] if p["type"] != "row")
    assert used - BUILTIN, "no service metric queried"
    assert used - exported - BUILTIN == set()
    assert all(_metric_names(e) for e in exprs)  # every query reads a series


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_use_the_provisioned_datasource(path):
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"] if d["type"] == "prometheus"}
    board = json.loads(path.read_text())
    used = {p["datasource"]["uid"] for p in board["panels"] if "datasource" in p}

    assert used and used <= uids
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_dashboards_provider_points_at_one_folder():
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "iomt.yml").read_text())

    assert provider["apiVersion"] == 1
    assert [p["type"] for p in provider["providers"]] == ["file"]
    assert provider["providers"][0]["options"]["path"].startswith("/")


def _targets(config: dict) -> dict[str, list[str]]:
    return {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
            for job in config["scrape_configs"]}


def test_cloud_scrape_config_targets_the_example_hosts_metrics_ports():
    config = yaml.safe_load((DEPLOY / "prometheus" / "cloud.yml").read_text())
    coord = load_settings(CoordinatorSettings, DEPLOY / "config" / "coordinator" / "coordinator.toml")
    parties = [load_settings(PartySettings, DEPLOY / "config" / f"party-{i}" / "party.toml") for i in (0, 1)]
    party_hosts = [urlparse(u).hostname for u in coord.party_urls]
    coord_host = urlparse(parties[0].coordinator_url).hostname

    targets = _targets(config)

    assert targets["iomt-party"] == [f"{h}:{p.metrics_port}" for h, p in zip(party_hosts, parties)]
    assert targets["iomt-coordinator"] == [f"{coord_host}:{coord.metrics_port}"]
    assert [p.metrics_port for p in parties] == [9101, 9101] and coord.metrics_port == 9102


def test_hospital_scrape_config_targets_the_edge_metrics_port():
    config = yaml.safe_load((DEPLOY / "prometheus" / "hospital.yml").read_text())
    edges = [load_settings(EdgeSettings, p) for p in sorted((DEPLOY / "config").glob("hospital-*/edge.toml"))]

    targets = _targets(config)

    assert {e.metrics_port for e in edges} == {9100}
    assert targets["iomt-edge"] == [f"{edges[0].metrics_host}:9100"]
