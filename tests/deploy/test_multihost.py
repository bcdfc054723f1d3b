"""Every role on its own host, as README "Each role on its own machine" tells an operator: six
network namespaces (party-0, party-1, triples, coordinator, hospital-a, hospital-b) on one
bridge, each with the example address and ITS firewall (deploy/firewall/<host>.nft) loaded,
WireGuard between the MPC hosts (deploy/wireguard/mpc-wg.sh), and every service started as
``iomt <role> --config <file>`` from deploy/config/<host>/<role>.toml.

The configs are used as they are, with only what README tells an operator to change:
``/etc/iomt`` and ``/var/lib/iomt`` point at this host's folders (:func:`install`), host names
resolve through the host's /etc/hosts (``/etc/netns/<ns>/hosts``), secrets and the run's
length come from the environment (``IOMT_EDGE_PASSWORD``, ``IOMT_DEVICE_PASSWORD``,
``IOMT_COORD_ROUNDS=2``, ``IOMT_FEDERATE_RETRY_MAX=5``), and the test-only ``IOMT_DEVICE_CA_FILE`` (the device trusts the
system store on a real gateway) and ``IOMT_BROKER_USER=root`` (these folders are root's).

Flow: the services start in the "wrong" order (hospitals' `federate` before the coordinator,
the coordinator before the parties, the triples provider last); two federated rounds with
both hospitals (DP-SGD, a tiny model); party 1 is restarted between rounds 1 and 2; a device
publishes through its hospital's broker to the edge; then an encrypted inference
(`iomt infer`) from hospital-a. The firewalls are checked to drop what no flow allows.

Needs root, iproute2, nftables, wireguard-tools (and the kernel's WireGuard or wireguard-go),
util-linux's unshare and Mosquitto; skipped with the reason otherwise.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iomt.supervisor import REPO_ROOT, child_env, run_iomt, spawn, stop
from tests.utils.netns import Hosts, why_not
from tests.utils.records import write_store

pytestmark = [pytest.mark.integration, pytest.mark.netns]

DEPLOY = REPO_ROOT / "deploy"
#: The example hosts and their addresses (deploy/firewall/*.nft, README), on one bridge.
ADDRESS = {"party-0": "192.0.2.11/24", "party-1": "192.0.2.12/24", "triples": "192.0.2.13/24",
           "coordinator": "192.0.2.20/24", "hospital-a": "198.51.100.10/24", "hospital-b": "198.51.100.20/24"}
TUNNEL = {"party-0": "10.99.0.1/24", "party-1": "10.99.0.2/24", "triples": "10.99.0.3/24"}
#: What each host name in deploy/config resolves to (an operator's DNS).
NAMES = {"party-0.cloud.example": "party-0", "party-1.cloud.example": "party-1",
         "coordinator.cloud.example": "coordinator", "broker.hospital-a.example": "hospital-a",
         "broker.hospital-b.example": "hospital-b"}
HOSPITALS = ("hospital-a", "hospital-b")
ROUNDS = 2
PATIENTS = 16
PARTY_URLS = "https://party-0.cloud.example:8800,https://party-1.cloud.example:8800"
#: a tiny model with the MPC-friendly head, so that training and encrypted inference take seconds
MODEL = {"dim": 8, "ehr_hidden": 8, "lstm_hidden": 8, "lstm_layers": 1, "text_layers": 1, "cnn_channels": [2, 4, 4],
         "text_vocab": 64, "text_len": 12, "signal_pool": 25, "fusion": "quadratic"}


def _skip_reason() -> str | None:
    for tool in ("nft", "unshare", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return why_not(("ip", "wg", "nft"), wireguard=True)


# --- the credential step (README "Each role on its own machine"): keys made on each host ---

#: Each host's principal and role; the cloud hosts' certificates name what clients dial.
PRINCIPALS = {"party-0": ("party", ["party-0.cloud.example"]), "party-1": ("party", ["party-1.cloud.example"]),
              "coordinator": ("coordinator", ["coordinator.cloud.example"]),
              "hospital-a": ("hospital", []), "hospital-b": ("hospital", [])}


def make_credentials(site: "Site", work: Path) -> dict[str, dict[str, Path]]:
    """What README tells the operator and each host to do: the operator's CA (``iomt ca init``);
    on each host, inside its own namespace, ``iomt keys init`` into ``/etc/iomt/keys`` (its token
    and TLS keys never leave it); the operator signs each request and registers each public
    token key (``iomt ca sign``, ``iomt ca register``); each host installs its certificate with
    the CA and its CRL (``iomt keys install``). A hospital's broker certificate comes from the
    hospital's own PKI: here a second CA made on the hospital host. Returns the public files each
    host receives, as ``{host: {path under /etc/iomt: source}}``."""
    ca, registry = work / "operator" / "ca", work / "operator" / "registry.json"
    run_iomt("ca", "init", "--dir", str(ca))

    def on(host: str, *args: str) -> None:  # a command run on that host, as its services are
        subprocess.run(site.net.argv(host, sys.executable, "-m", "iomt", *args), check=True, capture_output=True,
                       env=child_env(one_thread=True), timeout=120)

    for host, (role, names) in PRINCIPALS.items():
        keys = work / host / "etc" / "keys"
        on(host, "keys", "init", "--id", host, "--role", role, "--dir", str(keys),
           *[a for n in names for a in ("--tls-name", n)])
        run_iomt("ca", "sign", "--dir", str(ca), "--csr", str(keys / "tls.csr"), "--id", host, "--role", role)
        run_iomt("ca", "register", "--registry", str(registry), "--id", host, "--role", role,
                 "--public-key", str(keys / "token.pub"))
        on(host, "keys", "install", "--dir", str(keys), "--cert", str(ca / "certs" / f"{host}.pem"),
           "--ca", str(ca / "ca.pem"), "--crl", str(ca / "crl.pem"))
        assert not any(p.name.endswith(".key") or p.name == "token.json" for p in (work / "operator").rglob("*")
                       if p.is_file() and p.name != "ca.key"), "a host's private key reached the operator"
    files: dict[str, dict[str, Path]] = {h: {} for h in ADDRESS}
    for host in ("party-0", "party-1", "coordinator"):
        files[host]["registry.json"] = registry
    for h in HOSPITALS:  # the broker's certificate, from the hospital's own CA, made on the hospital host
        site_ca, broker_keys = work / h / "site-ca", work / h / "broker-keys"
        on(h, "ca", "init", "--dir", str(site_ca))
        on(h, "keys", "init", "--id", "broker", "--role", "service", "--dir", str(broker_keys),
           "--tls-name", f"broker.{h}.example")
        on(h, "ca", "sign", "--dir", str(site_ca), "--csr", str(broker_keys / "tls.csr"), "--id", "broker",
           "--role", "service")
        files[h].update({"tls/ca.pem": site_ca / "ca.pem", "tls/broker.pem": site_ca / "certs" / "broker.pem",
                         "tls/broker.key": broker_keys / "tls.key"})
    return files


def install(work: Path, host: str, files: dict[str, Path]) -> dict[str, Path]:
    """A host's /etc/iomt (``work/host/etc``) and /var/lib/iomt (``work/host/var``): the given
    files, and each deploy/config/<host>/*.toml with only those two folders replaced.
    Returns role -> its settings file."""
    etc, var = work / host / "etc", work / host / "var"
    var.mkdir(parents=True)
    for rel, src in files.items():
        (etc / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, etc / rel)
    configs = {}
    for example in sorted((DEPLOY / "config" / host).glob("*.toml")):
        text = example.read_text().replace("/etc/iomt", str(etc)).replace("/var/lib/iomt", str(var))
        configs[example.stem] = etc / example.name
        configs[example.stem].parent.mkdir(parents=True, exist_ok=True)
        configs[example.stem].write_text(text)
    return configs


def firewall(host: str) -> Path:
    """deploy/firewall/<host>.nft as it is: its example addresses are the ones this test uses."""
    return DEPLOY / "firewall" / f"{host}.nft"


class Site:
    """The six hosts, their files and their services."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.net = Hosts(work, list(ADDRESS), ADDRESS)
        self.procs: dict[str, subprocess.Popen] = {}
        self.cmds: dict[str, tuple[str, list[str], dict]] = {}
        self.configs: dict[str, dict[str, Path]] = {}

    def up(self) -> Site:
        self.net.up()
        for host in ADDRESS:
            self.net.hosts_file(host, {name: self.net.under[h] for name, h in NAMES.items()})
            self.net.exec(host, "nft", "-f", str(firewall(host)))
        self.net.wireguard(list(TUNNEL), TUNNEL, "wg0")
        return self

    def start(self, name: str, host: str, args: list[str], env: dict | None = None) -> None:
        self.cmds[name] = (host, args, env or {})
        argv = self.net.argv(host, sys.executable, "-m", "iomt", "-v", *args)
        self.procs[name] = spawn(argv, self.work / "logs" / f"{name}.log", child_env(env, one_thread=True))

    def restart(self, name: str) -> None:
        stop(self.procs.pop(name))
        self.start(name, *self.cmds[name][:2], self.cmds[name][2])

    def log(self, name: str) -> str:
        return (self.work / "logs" / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                         for p in sorted((self.work / "logs").glob("*.log")))

    def check_alive(self, *names: str) -> None:
        for name in names:
            code = self.procs[name].poll()
            assert code is None, f"{name} exited {code}:\n{self.log(name)[-4000:]}"

    def reaches(self, src: str, host: str, port: int) -> bool:
        """Whether a TCP connection from ``src`` to ``host:port`` opens (a dropped SYN: no)."""
        probe = (f"import socket; socket.create_connection(({self.net.under[host]!r}, {port}), timeout=2)")
        return self.net.exec(src, sys.executable, "-c", probe, check=False).returncode == 0

    def down(self) -> None:
        for proc in reversed(list(self.procs.values())):
            stop(proc)
        self.net.down()


@pytest.fixture
def site(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    (tmp_path / "logs").mkdir()
    s = Site(tmp_path)
    try:
        yield s.up()
    finally:
        s.down()


def _wait(cond, what: str, site: Site, timeout: float, alive: tuple[str, ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        site.check_alive(*alive)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s\n{site.logs()}")
        time.sleep(0.5)


def test_six_hosts_two_rounds_party_restart_and_encrypted_inference(site: Site):
    work = site.work
    # Prepare: the operator's credentials and model file, each host's files, the hospitals' data
    handed = make_credentials(site, work)
    (work / "model-config.json").write_text(json.dumps(MODEL))
    run_iomt("edge", "federate", "--write-model", str(work / "model.json"), "--model-config",
             str(work / "model-config.json"))
    handed["coordinator"]["model.json"] = work / "model.json"
    for host in ADDRESS:
        site.configs[host] = install(work, host, handed[host])
    secrets = {}
    for h in HOSPITALS:
        secrets[h] = {"edge": f"edge-secret-{h}", "device": f"device-secret-{h}"}
        pw = work / h / "etc" / "mosquitto" / "passwords"
        pw.parent.mkdir()
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), f"edge-{h}", secrets[h]["edge"]], check=True)
        subprocess.run(["mosquitto_passwd", "-b", str(pw), "ward3-bed12-wearable", secrets[h]["device"]], check=True)
        # the hospital's patients (the EHR feed and notes), already in the edge's store
        write_store(work / h / "var" / "edge", PATIENTS, seed=HOSPITALS.index(h), hospital=h)
    cfg = site.configs

    # Execute: start in the "wrong" order; federate waits for the coordinator (retries)
    for h in HOSPITALS:
        site.start(f"{h}-broker", h, ["broker", "--config", str(cfg[h]["broker"])], {"IOMT_BROKER_USER": "root"})
        site.start(f"{h}-edge", h, ["edge", "run", "--config", str(cfg[h]["edge"])],
                   {"IOMT_EDGE_PASSWORD": secrets[h]["edge"]})
        # retry_max: pauses between retries up to 5 s rather than 30, so the run does not idle once the cloud is up
        site.start(f"{h}-federate", h, ["edge", "federate", "--config", str(cfg[h]["federate"]), "--json"],
                   {"IOMT_FEDERATE_RETRY_MAX": "5"})
    site.start("device", "hospital-a", ["device", "--config", str(cfg["hospital-a"]["device"])],
               {"IOMT_DEVICE_PASSWORD": secrets["hospital-a"]["device"],
                "IOMT_DEVICE_CA_FILE": str(work / "hospital-a" / "etc" / "tls" / "ca.pem")})
    _wait(lambda: all("register" in site.log(f"{h}-federate") for h in HOSPITALS), "federate retrying", site, 300)
    site.start("coordinator", "coordinator", ["cloud", "coordinator", "--config", str(cfg["coordinator"]["coordinator"])],
               {"IOMT_COORD_ROUNDS": str(ROUNDS)})
    for i in (0, 1):
        site.start(f"party-{i}", f"party-{i}", ["cloud", "party", "--config", str(cfg[f"party-{i}"]["party"])])
    site.start("triples", "triples", ["cloud", "triples", "--config", str(cfg["triples"]["triples"])])

    services = ("coordinator", "party-0", "party-1", "triples", *(f"{h}-{r}" for h in HOSPITALS
                                                                   for r in ("broker", "edge")))
    _wait(lambda: "round 1 done" in site.log("coordinator"), "round 1 done", site, 600, services)
    site.restart("party-1")  # mid-federation: round 2 is open, hospitals fetch v1 and upload to it
    feds = {h: site.procs[f"{h}-federate"] for h in HOSPITALS}
    _wait(lambda: all(p.poll() is not None for p in feds.values()), "federate finished", site, 600, services)
    codes = {h: p.returncode for h, p in feds.items()}
    assert codes == {h: 0 for h in HOSPITALS}, site.logs()
    # the MPC group re-forms after the restart; then the clinician's encrypted query from hospital-a
    answer, keys = None, work / "hospital-a" / "etc" / "keys"
    for _ in range(60):
        done = subprocess.run(site.net.argv(
            "hospital-a", sys.executable, "-m", "iomt", "infer", "--patient", "hospital-a-p0001", "--data-dir",
            str(work / "hospital-a" / "var" / "edge"), "--parties", PARTY_URLS, "--key-file",
            str(keys / "token.json"), "--ca", str(keys / "ca.pem"), "--tls-cert", str(keys / "tls.pem"),
            "--tls-key", str(keys / "tls.key"), "--tls-crl", str(keys / "crl.pem"), "--json"),
            capture_output=True, text=True, env=child_env(one_thread=True), timeout=300)
        if done.returncode == 0:
            answer = json.loads(done.stdout)
            break
        assert "mpc_unavailable" in done.stdout + done.stderr or "not ready" in done.stdout + done.stderr, \
            done.stdout + done.stderr + site.logs()
        time.sleep(2)
    assert answer is not None, site.logs()

    # Assert: two rounds at both hospitals, each with both hospitals in, v2 at the edge
    for h in HOSPITALS:
        report = json.loads(next(line for line in site.log(f"{h}-federate").splitlines() if line.startswith("{")))
        assert [r["round"] for r in report["rounds"]] == [1, 2] and all(not r["excluded"] for r in report["rounds"])
        assert report["global"]["version"] == ROUNDS
        assert "Traceback" not in site.log(f"{h}-federate")
    coord = site.log("coordinator")
    assert "round 2 done" in coord and "participants ['hospital-a', 'hospital-b']" in coord
    assert all(re.search(r"WARNING .*register .*ConnectError.*; retry 1 in", site.log(f"{h}-federate"))
               for h in HOSPITALS)
    assert all(abs(sum(row.values()) - 1) < 1e-3 for row in answer["probabilities"]), answer
    for m in ("party-0", "party-1", "triples"):
        assert "on WireGuard interface" in site.log(m), site.log(m)[-3000:]
    # the device's frames crossed its broker (TLS, its own account) into the edge
    status = json.loads(run_iomt("edge", "status", "--data-dir", str(work / "hospital-a" / "var" / "edge"),
                                 "--json").stdout)
    assert status["stored"]["by_device"].get("ward3-bed12-wearable", 0) > 0, status
    # the firewalls: what a documented flow allows opens, what none does is dropped
    assert site.reaches("hospital-a", "coordinator", 8790) and site.reaches("hospital-b", "party-1", 8800)
    assert not site.reaches("triples", "coordinator", 8790)      # the provider has no business there
    assert not site.reaches("coordinator", "hospital-a", 8883)   # brokers take the ward network only
    assert not site.reaches("hospital-b", "hospital-a", 8883)
