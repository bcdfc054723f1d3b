"""The MPC links on the wire: party 0, party 1 and the triples provider each in its own network
namespace, joined by a bridge (the "network"), with a packet capture on the bridge during
start-up and one encrypted inference.

Over WireGuard the capture holds no TCP at all, only WireGuard datagrams, and none of the
secret seeds that cross the links (the triple-generator seeds the provider sends each party,
the pairwise zero-sharing seeds) nor the query's shares. The control runs the same cloud on
the bare link (``--mpc-insecure``): there the same search finds the seeds, so the search
works. Both runs also check that no MPC listener binds a wildcard address.

Needs root, ``ip netns``, wireguard-tools and a WireGuard implementation (the kernel's, or
wireguard-go when the kernel lacks it), and tshark; skipped with the reason otherwise.
"""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from cloud_aggregator.inference import client as inference_client
from cloud_aggregator.inference.publish import publish_shared_model
from protocols.auth import Signer, make_credentials
from protocols.model import ModelConfig, build_model, state_to_numpy
from iomt.supervisor import REPO_ROOT, child_env, die_with_parent, spawn, stop
from tests.utils.netns import WG_PORT, Hosts, why_not, wait
from tests.utils.text import random_tokens

pytestmark = pytest.mark.integration

PROBE = REPO_ROOT / "tests" / "utils" / "mpc_seed_probe.py"
MEMBERS = ("p0", "p1", "tp")  # party 0, party 1, the triples provider
HTTP_PORT, MPC_PORT = 8800, 29500
READY_S = 120.0


class Net(Hosts):
    """Three namespaces on one bridge (underlay 10.N.0.x, the test process at .254), WireGuard
    between them (10.N+1.0.x)."""

    def up(self) -> Net:
        super().up()
        self.add_root_address(f"10.{self.net}.0.254/24")  # the test reaches the parties' HTTP APIs
        self.tunnel = {m: f"10.{self.net + 1}.0.{i + 1}" for i, m in enumerate(MEMBERS)}
        self.wireguard(MEMBERS, {m: f"{a}/24" for m, a in self.tunnel.items()}, lambda m: f"w{self.tag}{m}")
        return self


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    reason = why_not(("ip", "wg", "tshark", "ss"), wireguard=True)
    if reason:
        pytest.skip(reason)
    net = Net(tmp_path_factory.mktemp("mpcnet"), MEMBERS)
    try:
        yield net.up()
    finally:
        net.down()


def _launch(net: Net, m: str, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`iomt <args>` in member m's namespace (through the seed probe, see mpc_seed_probe.py)."""
    cmd = net.argv(m, sys.executable, str(PROBE), "-v", *args)
    return spawn(cmd, log, child_env(env, one_thread=True))


def _wildcard_listeners(net: Net) -> list[str]:
    """TCP listeners bound to every interface, in any member's namespace."""
    found = []
    for m in MEMBERS:
        for line in net.exec(m, "ss", "-Hltn").stdout.splitlines():
            local = line.split()[3]
            if local.rpartition(":")[0] in ("*", "0.0.0.0", "[::]", "::"):
                found.append(f"{m} {local}")
    return found


def _run_cloud(net: Net, work: Path, tunnel: bool) -> dict:
    """Start the cloud in the namespaces, capture the bridge, run one inference; what was seen."""
    work.mkdir()
    registry = make_credentials(work / "creds", ["hospital-a"], 2)
    signer = Signer.from_file(work / "creds" / "keys" / "hospital-a.json")
    torch.manual_seed(1)
    cfg = ModelConfig(dim=16)
    model = build_model(cfg).eval()
    dirs = [work / "party0", work / "party1"]
    publish_shared_model(dirs, [state_to_numpy(model)], [1], "multimodal", json.loads(cfg.to_json()))
    addr = net.tunnel if tunnel else net.under
    link = (lambda m: ["--mpc-interface", net.wg[m]]) if tunnel else \
        (lambda m: ["--mpc-address", net.under[m], "--mpc-insecure"])
    master = f"{addr['p0']}:{MPC_PORT}"
    # Capture everything on the bridge but the test's own HTTP calls to the parties (their link is
    # not an MPC link; the hospital's HTTPS is another issue's).
    pcap = work / "link.pcapng"
    tshark = subprocess.Popen(["tshark", "-i", net.bridge, "-w", str(pcap), "-f", f"not tcp port {HTTP_PORT}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    wait(lambda: pcap.exists(), "tshark")
    procs = {"tp": _launch(net, "tp", ["cloud", "triples", "--parties", "2", "--mpc-master", master, *link("tp")],
                           work / "tp.log", {})}
    for i, m in enumerate(("p0", "p1")):
        procs[m] = _launch(net, m, ["cloud", "party", "--index", str(i), "--parties", "2", "--data-dir",
                                    str(dirs[i]), "--listen", f"{net.under[m]}:{HTTP_PORT}", "--registry",
                                    str(registry), "--mpc-master", master, "--insecure-http", *link(m)],
                           work / f"{m}.log", {"IOMT_TEST_SEED_FILE": str(work / f"seeds-{m}.jsonl")})
    urls = [f"http://{net.under[m]}:{HTTP_PORT}" for m in ("p0", "p1")]
    shares: list = []
    try:
        def ready() -> bool:
            for m, proc in procs.items():
                assert proc.poll() is None, f"{m} exited {proc.returncode}: {(work / f'{m}.log').read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                return all(httpx.get(f"{u}/inference/v1/status", timeout=2).json()["ready"] for u in urls)
            return False

        wait(ready, "the MPC group", READY_S)
        listeners = _wildcard_listeners(net)
        original = inference_client.share_inputs

        def keep(inputs, parties):
            shares.extend(original(inputs, parties))
            return shares

        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            feats = model.encode(torch.randn(2, 1, cfg.image_size, cfg.image_size, generator=gen),
                                 torch.randn(2, cfg.ehr_dim, generator=gen),
                                 torch.randn(2, cfg.signal_len, cfg.signal_channels, generator=gen),
                                 random_tokens(cfg, 2, gen))
        inference_client.share_inputs = keep
        try:
            pred = inference_client.predict(urls, signer, {"features": feats.numpy(), "mask": np.ones((2, 4), "f4")})
        finally:
            inference_client.share_inputs = original
        assert pred.outputs["logits"].shape == (2, 3)
    finally:
        for proc in procs.values():
            stop(proc)
        time.sleep(0.5)  # let the last segments reach the capture
        tshark.send_signal(signal.SIGINT)
        tshark.wait(15)
    seeds = [json.loads(line) for m in ("p0", "p1") for line in (work / f"seeds-{m}.jsonl").read_text().splitlines()]
    return {"pcap": pcap, "seeds": seeds, "shares": shares, "listeners": listeners,
            "logs": {m: (work / f"{m}.log").read_text() for m in procs}}


def _payloads(pcap: Path) -> tuple[list[bytes], int, int]:
    """Every TCP direction's bytes, reassembled in sequence order, and every UDP payload;
    with the count of TCP segments and of WireGuard datagrams."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-E", "separator=/t", "-e", "tcp.stream",
                          "-e", "tcp.srcport", "-e", "tcp.seq_raw", "-e", "tcp.payload", "-e", "udp.dstport",
                          "-e", "udp.payload"], capture_output=True, text=True, check=True, timeout=120).stdout
    streams: dict[tuple[str, str], dict[int, bytes]] = {}
    datagrams, tcp, wg = [], 0, 0
    for line in out.splitlines():
        stream, sport, seq, tpay, dport, upay = (line.split("\t") + [""] * 6)[:6]
        if stream:
            tcp += 1
            if tpay:
                streams.setdefault((stream, sport), {})[int(seq)] = bytes.fromhex(tpay.replace(":", ""))
        elif upay:
            datagrams.append(bytes.fromhex(upay.replace(":", "")))
            wg += dport == str(WG_PORT)
    joined = [b"".join(seg for _, seg in sorted(parts.items())) for parts in streams.values()]
    return joined + datagrams, tcp, wg


def _secrets(run: dict) -> dict[str, bytes]:
    """The seeds the parties received, and 16-byte windows of each party's share of the query."""
    found = {}
    for i, record in enumerate(run["seeds"]):
        for kind in ("ttp", "przs_next"):
            found[f"{kind} seed of party record {i}"] = bytes.fromhex(record[kind])
    for i, party in enumerate(run["shares"]):
        for name, share in party.items():
            data = np.ascontiguousarray(share.to_array()).astype("<i8").tobytes()
            for at in range(0, len(data) - 16, 64):
                found[f"party {i}'s share of {name} @{at}"] = data[at:at + 16]
    return found


def _search(run: dict) -> tuple[list[str], int, int]:
    payloads, tcp, wg = _payloads(run["pcap"])
    raw = run["pcap"].read_bytes()
    hits = [what for what, needle in _secrets(run).items() if needle in raw or any(needle in p for p in payloads)]
    return hits, tcp, wg


def test_mpc_links_over_wireguard_carry_no_secret_in_clear(net, tmp_path):
    # Execute: the cloud on the tunnel, then the same cloud on the bare link (the control)
    tunnel = _run_cloud(net, tmp_path / "tunnel", tunnel=True)
    bare = _run_cloud(net, tmp_path / "bare", tunnel=False)
    hits, tcp, wg = _search(tunnel)
    control_hits, control_tcp, _ = _search(bare)
    # Assert: the ground truth exists (two parties' seeds, both parties' shares)
    assert len(tunnel["seeds"]) == 2 and all("ttp" in s for s in tunnel["seeds"]) and len(tunnel["shares"]) == 2
    # over WireGuard: no TCP crossed the network, only WireGuard datagrams, and no secret in them
    assert tcp == 0 and wg > 100, (tcp, wg)
    assert hits == []
    assert all("on WireGuard interface" in tunnel["logs"][m] for m in MEMBERS)
    # the control: the bare link carries the triple seeds and the zero-sharing seeds in clear
    assert control_tcp > 100
    assert {h.split(" seed")[0] for h in control_hits} >= {"ttp", "przs_next"}, control_hits
    assert all(f"seed of party record {i}" in " ".join(control_hits) for i in range(2))
    assert all("NOT protected" in bare["logs"][m] for m in MEMBERS)
    # and the query's shares never cross an MPC link at all (each went to its own party over HTTP)
    assert not [h for h in control_hits if "share" in h]
    # listeners: the rendezvous and gloo bind the MPC address only, never every interface
    assert tunnel["listeners"] == [] and bare["listeners"] == []


def test_party_refuses_an_unprotected_link(net, tmp_path):
    """Off loopback, without WireGuard and without --mpc-insecure: the party and the provider exit 2."""
    master = f"{net.under['p0']}:{MPC_PORT}"
    registry = make_credentials(tmp_path / "creds", ["hospital-a"], 2)
    party = _launch(net, "p0", ["cloud", "party", "--index", "0", "--parties", "2", "--data-dir",
                                str(tmp_path / "d0"), "--listen", f"{net.under['p0']}:{HTTP_PORT}",
                                "--registry", str(registry), "--mpc-master", master, "--insecure-http"],
                    tmp_path / "p0.log", {})
    provider = _launch(net, "tp", ["cloud", "triples", "--parties", "2", "--mpc-master", master,
                                   "--mpc-address", net.under["tp"]], tmp_path / "tp.log", {})
    assert party.wait(60) == 2 and provider.wait(60) == 2
    for m in ("p0", "tp"):
        assert "refusing to join the MPC group" in (tmp_path / f"{m}.log").read_text()
        assert "is not a WireGuard interface" in (tmp_path / f"{m}.log").read_text()
