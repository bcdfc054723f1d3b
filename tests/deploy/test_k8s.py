"""deploy/k8s: every overlay builds with `kubectl kustomize` (throwaway keys and certificates
made here by the commands its secrets/README.md gives, `iomt keys init` in the overlay's
secrets/ folder, `iomt ca sign` and `iomt keys install`, and WireGuard configs; never
committed), every document validates against the Kubernetes schema (kubernetes-validate,
offline, strict), the NetworkPolicies allow exactly the documented flows after a default
deny, pods run non-root with read-only root file systems and probe /health and /ready with
their own client certificate (`iomt probe`: mutual TLS is required there too), and each role
reads the same deploy/config file as its systemd unit, with every file that file names
mounted and its state on a volume."""
from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from iomt.cli import main as iomt
from tests.utils.deploy import (DEPLOY, IOMT_UID, REPO, covered, data_dir, etc_paths, settings_file,
                                throwaway_wireguard_conf)

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (its kustomize builds the overlays)")

#: Schema version the documents must validate against (kubernetes-validate ships it).
K8S_VERSION = "1.32.0"
OVERLAYS = ["party-0", "party-1", "triples", "coordinator"]
#: overlay -> the role (deploy/config/<overlay>/<role>.toml) and the workload kind running it
ROLE = {"party-0": ("party", "StatefulSet"), "party-1": ("party", "StatefulSet"),
        "triples": ("triples", "Deployment"), "coordinator": ("coordinator", "StatefulSet")}
#: The example addresses in the overlays' networkpolicy.yaml (documentation ranges, RFC 5737).
ADDRESS = {"198.51.100.10/32": "hospital-a", "198.51.100.20/32": "hospital-b", "203.0.113.10/32": "party-0",
           "203.0.113.11/32": "party-1", "203.0.113.12/32": "triples", "203.0.113.20/32": "coordinator"}
HOSPITALS = ("hospital-a", "hospital-b")
DNS = ("kube-dns", "UDP", 53), ("kube-dns", "TCP", 53)
PROMETHEUS = "monitoring/prometheus"


def _flows(direction: str, peers, proto: str, port) -> set[tuple]:
    return {(direction, peer, proto, port) for peer in peers}


def _metrics_port(host: str, role: str) -> int:
    """Prometheus scrapes the metrics listener the host's TOML configures."""
    return tomllib.loads((DEPLOY / "config" / host / f"{role}.toml").read_text())["metrics_port"]


def expected_flows(overlay: str) -> set[tuple]:
    """(in|out, peer, protocol, port) of README's "Kubernetes" table; DNS and the scrape for all."""
    flows = {("out", peer, proto, port) for peer, proto, port in DNS}
    if overlay.startswith("party-"):
        other = f"party-{1 - int(overlay[-1])}"
        flows |= _flows("in", [*HOSPITALS, "coordinator"], "TCP", 8800)
        flows |= _flows("in", [other, "triples"], "UDP", 51820)
        flows |= _flows("out", ["coordinator"], "TCP", 8790)
        flows |= _flows("out", [other, "triples"], "UDP", 51820)
        flows.add(("in", PROMETHEUS, "TCP", _metrics_port(overlay, "party")))
    elif overlay == "coordinator":
        flows |= _flows("in", [*HOSPITALS, "party-0", "party-1"], "TCP", 8790)
        flows |= _flows("out", ["party-0", "party-1"], "TCP", 8800)
        flows.add(("in", PROMETHEUS, "TCP", _metrics_port(overlay, "coordinator")))
    elif overlay == "triples":
        flows |= _flows("in", ["party-0", "party-1"], "UDP", 51820)
        flows |= _flows("out", ["party-0", "party-1"], "UDP", 51820)
    return flows


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, list[dict]]:
    """overlay -> its documents, built from a copy of deploy/ with throwaway operator files."""
    root = tmp_path_factory.mktemp("k8s")
    shutil.copytree(DEPLOY, root / "deploy", ignore=shutil.ignore_patterns("secrets"))
    overlays = root / "deploy" / "k8s" / "overlays"
    ca, registry = root / "operator" / "ca", root / "operator" / "registry.json"

    def run(*argv) -> int:
        return iomt([str(a) for a in argv])

    assert run("ca", "init", "--dir", ca) == 0
    for overlay in OVERLAYS:
        (overlays / overlay / "secrets").mkdir()
    for overlay in ("party-0", "party-1", "coordinator"):   # as each secrets/README.md says
        role, secrets = ROLE[overlay][0], overlays / overlay / "secrets"
        assert run("keys", "init", "--id", overlay, "--role", role, "--dir", secrets,
                   "--tls-name", f"{overlay}.cloud.example") == 0
        assert run("ca", "sign", "--dir", ca, "--csr", secrets / "tls.csr", "--id", overlay, "--role", role,
                   "--days", "1", "--out", root / "operator" / f"{overlay}.pem") == 0
        assert run("ca", "register", "--registry", registry, "--id", overlay, "--role", role,
                   "--public-key", secrets / "token.pub") == 0
        assert run("keys", "install", "--dir", secrets, "--cert", root / "operator" / f"{overlay}.pem",
                   "--ca", ca / "ca.pem", "--crl", ca / "crl.pem") == 0
    model = {"arch": "toy", "config": {}, "init_seed": 1, "spec": [["w", [4, 3]], ["b", [3]]]}
    docs = {}
    for overlay in OVERLAYS:
        secrets = overlays / overlay / "secrets"
        shutil.copy(registry, secrets / "registry.json")
        (secrets / "wg0.conf").write_text(throwaway_wireguard_conf())
        (secrets / "model.json").write_text(json.dumps(model))
        done = subprocess.run([KUBECTL, "kustomize", str(secrets.parent)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{overlay}: {done.stderr}"
        docs[overlay] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return docs


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def _workload(docs: list[dict], overlay: str) -> dict:
    return _one(docs, ROLE[overlay][1])


def test_no_operator_file_is_committed():
    tracked = subprocess.run(["git", "ls-files", "deploy/k8s"], cwd=REPO, capture_output=True, text=True).stdout.split()
    secret_files = [p for p in tracked if "/secrets/" in p]
    assert secret_files and all(p.endswith("/secrets/README.md") for p in secret_files), secret_files


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_validates_against_the_schema(built, overlay):
    import kubernetes_validate

    kinds = set()
    for doc in built[overlay]:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError
        kinds.add(doc["kind"])
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == f"iomt-{overlay}"
    assert {"Namespace", "ConfigMap", "Service", "NetworkPolicy", ROLE[overlay][1]} <= kinds


def test_validator_refuses_a_misspelt_field(built):
    """The schema check is not a no-op: strict validation catches an unknown field."""
    import kubernetes_validate

    doc = json.loads(json.dumps(_workload(built["party-0"], "party-0")))
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _peer(entry: dict) -> str:
    if "ipBlock" in entry:
        assert "except" not in entry["ipBlock"]
        return ADDRESS[entry["ipBlock"]["cidr"]]
    ns = entry["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    pod = entry["podSelector"]["matchLabels"]
    if ns == "kube-system" and pod == {"k8s-app": "kube-dns"}:
        return "kube-dns"
    assert ns == "monitoring" and pod == {"app.kubernetes.io/name": "prometheus"}, entry
    return PROMETHEUS


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _port(port, container_ports: list[dict]) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container_ports if p["name"] == port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_documented_flows(built, overlay):
    docs = built[overlay]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = _one(docs, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    pod = _workload(docs, overlay)["spec"]["template"]
    labels = pod["metadata"]["labels"]
    ports = [p for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    flows = set()
    for policy in policies:
        spec = policy["spec"]
        if not _selects(spec["podSelector"], labels):
            continue
        for direction, rules, key in (("in", spec.get("ingress", []), "from"), ("out", spec.get("egress", []), "to")):
            assert not rules or ("Ingress" if direction == "in" else "Egress") in spec["policyTypes"]
            for rule in rules:
                assert rule.get(key) and rule.get("ports"), f"{policy['metadata']['name']}: a rule open to all"
                for peer in rule[key]:
                    for p in rule["ports"]:
                        flows.add((direction, _peer(peer), p["protocol"], _port(p["port"], ports)))
    assert flows == expected_flows(overlay), (
        f"missing {sorted(expected_flows(overlay) - flows)}, extra {sorted(flows - expected_flows(overlay))}")
    # every port a policy lets in is one the pod listens on
    inbound = {(proto, port) for d, _, proto, port in flows if d == "in"}
    assert inbound <= {(p["protocol"], p["containerPort"]) for p in ports}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_read_only_without_capabilities(built, overlay):
    pod = _workload(built[overlay], overlay)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IOMT_UID and pod["securityContext"]["runAsGroup"] == IOMT_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and "runAsUser" not in sc, c["name"]
        assert c["image"] == "registry.example/iomt:0.1.0"
    for c in pod.get("initContainers", []):
        # the one exception: the WireGuard set-up, root with NET_ADMIN alone, then it exits
        assert c["name"] == "wireguard" and c["command"][0] == "mpc-wg.sh"
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert bool(pod.get("initContainers")) == (overlay != "coordinator")


@pytest.mark.parametrize("overlay", ["party-0", "party-1", "coordinator"])
def test_probes_present_the_services_own_certificate(built, overlay):
    """The party and the coordinator require a client certificate signed by the federation's CA
    on every connection, /health and /ready too, which the kubelet's httpGet cannot present:
    each probe runs `iomt probe` with the service's own settings file, whose tls_cert and tls_key
    (from the Secret iomt-keys) it presents (tests/deploy/test_services_from_config.py runs it
    against real services, and a client without a certificate is refused there)."""
    role = ROLE[overlay][0]
    pod = _workload(built[overlay], overlay)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = tomllib.loads(settings_file(overlay, role).read_text())
    https = next(p["containerPort"] for p in container["ports"] if p["name"] == "https")
    assert https == settings["port"]
    for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert set(container[probe]) & {"httpGet", "tcpSocket", "grpc"} == set(), probe
        assert container[probe]["exec"]["command"] == [
            "iomt", "probe", f"https://127.0.0.1:{https}{path}", "--config", container["args"][-1]], probe
        assert container[probe]["timeoutSeconds"] >= 5, f"{probe}: an exec probe's default 1 s is under a Python start"
    # the file the probe reads names the service's own certificate and key, mounted from its Secret
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for key in ("tls_cert", "tls_key", "tls_ca"):
        path = settings[key]
        (target,) = [t for t in mounts if covered(path, {t: ""})]
        secret = volumes[mounts[target]["name"]]["secret"]["secretName"]
        assert Path(path).name in _one(built[overlay], "Secret", secret)["data"], (key, path)
    # the server requires that certificate (no probe without one would pass), and the routes
    # need no token
    from cloud_aggregator import coordinator, party, serve
    assert "ssl_cert_reqs=ssl.CERT_REQUIRED" in Path(serve.__file__).read_text()
    source = Path(party.__file__ if overlay != "coordinator" else coordinator.__file__).read_text()
    assert '@app.get("/health")' in source and '@app.get("/ready"' in source


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_reads_its_deploy_config_file_with_everything_it_names_mounted(built, overlay):
    docs = built[overlay]
    role, kind = ROLE[overlay]
    workload = _one(docs, kind)
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][-2:] == ["--config", f"/etc/iomt/{role}.toml"]
    assert container["args"][:-2] == (["cloud", role])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = mounts[f"/etc/iomt/{role}.toml"]
    cm = _one(docs, "ConfigMap", volumes[config["name"]]["configMap"]["name"])
    toml = settings_file(overlay, role)
    assert cm["data"][config["subPath"]] == toml.read_text(), "the ConfigMap is deploy/config's file as it is"
    missing = [p for p in etc_paths(toml) if not covered(p, mounts)]
    assert not missing, f"{overlay}: {toml.name} names {missing}, which nothing mounts"
    # the files mounted one by one exist in their ConfigMap or Secret under that key
    for path, m in mounts.items():
        vol = volumes.get(m["name"], {})
        source = vol.get("configMap", {}).get("name") or vol.get("secret", {}).get("secretName")
        if source is None:
            continue
        obj = _one(docs, "ConfigMap" if "configMap" in vol else "Secret", source)
        keys = set(obj.get("data", {}))
        if "subPath" in m:
            assert m["subPath"] in keys, (path, keys)
        else:
            assert {Path(p).name for p in etc_paths(toml) if p.startswith(path + "/")} <= keys, (path, keys)
    state = data_dir(toml)
    if kind == "StatefulSet":
        claims = {t["metadata"]["name"] for t in workload["spec"]["volumeClaimTemplates"]}
        assert mounts[state]["name"] in claims, f"{overlay}: {state} is not on its PersistentVolumeClaim"
    else:
        assert state is None
    assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]["name"]]


@pytest.mark.parametrize("overlay", ["party-0", "party-1", "triples"])
def test_mpc_hosts_bring_up_their_tunnel_address(built, overlay):
    docs = built[overlay]
    tunnel = _one(docs, "ConfigMap", next(d["metadata"]["name"] for d in docs
                                          if d["metadata"]["name"].startswith("iomt-mpc")))["data"]["tunnel_address"]
    expected = {"party-0": "10.99.0.1/24", "party-1": "10.99.0.2/24", "triples": "10.99.0.3/24"}[overlay]
    assert tunnel == expected
    master = tomllib.loads(settings_file(overlay, ROLE[overlay][0]).read_text())["mpc_master"]
    assert master.split(":")[0] == "10.99.0.1", "the rendezvous is party 0's tunnel address"
    wireguard = _one(docs, "Service", "iomt-party-wireguard" if overlay != "triples" else "iomt-triples-wireguard")
    assert wireguard["spec"]["ports"][0]["protocol"] == "UDP" and wireguard["spec"]["publishNotReadyAddresses"]
