"""The MPC link rule (mpc.mpclink): loopback passes, anything else needs WireGuard or an
explicit --mpc-insecure; and the rendezvous and gloo listen on the MPC address only."""
from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import shutil

import psutil
import pytest
import torch.distributed as dist

from cloud_aggregator.mpc.mpclink import (MpcLinkError, bind_distributed, interface_addresses, resolve_link,
                                               wireguard_kind)
from iomt.supervisor import free_port

needs_ip = pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (`ip`) is not installed")


def _outside_address() -> str | None:
    """An IPv4 address of this host that is not loopback (on an interface that is not WireGuard)."""
    for ips in interface_addresses().values():
        for ip in ips:
            addr = ipaddress.ip_address(ip)
            if addr.version == 4 and not addr.is_loopback:
                return ip
    return None


@needs_ip
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_loopback_group_needs_no_tunnel(rank, caplog):
    with caplog.at_level(logging.INFO, logger="cloud_aggregator.mpc.mpclink"):
        link = resolve_link("127.0.0.1:29500", rank)
    assert (link.address, link.interface, link.protection) == ("127.0.0.1", "lo", "loopback")
    assert "no tunnel needed" in caplog.text


@needs_ip
@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"master": "198.51.100.7:29500", "rank": 1}, "set --mpc-interface"),
    ({"master": "127.0.0.1:29500", "rank": 1, "interface": "nosuch0"}, "does not exist"),
    ({"master": "127.0.0.1:29500", "rank": 1, "address": "198.51.100.8"}, "not an address of this host"),
    ({"master": "127.0.0.1:29500", "rank": 0, "address": "127.0.0.2"}, "must be the mpc master's host"),
    ({"master": "127.0.0.1", "rank": 0}, "HOST:PORT"),
])
def test_misconfigured_link_is_refused_with_the_reason(kwargs, reason):
    with pytest.raises(MpcLinkError, match=reason):
        resolve_link(**kwargs)


@needs_ip
def test_plain_interface_off_loopback_is_refused_unless_insecure(caplog):
    ip = _outside_address()
    if ip is None or shutil.which("wg") is None:
        pytest.skip("needs a non-loopback address and wireguard-tools")
    with pytest.raises(MpcLinkError, match="is not a WireGuard interface"):
        resolve_link(f"{ip}:29500", 0)
    with caplog.at_level(logging.WARNING):
        link = resolve_link(f"{ip}:29500", 0, insecure=True)
    assert link.protection == "insecure" and link.address == ip
    assert "NOT protected" in caplog.text


@needs_ip
def test_rendezvous_and_gloo_listen_on_the_mpc_address_only(monkeypatch):
    """torch's tcp:// rendezvous alone listens on every interface (``*:port``)."""
    monkeypatch.setattr(dist, "init_process_group", dist.init_process_group)  # restored after the test
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "")
    port = free_port()
    bind_distributed(resolve_link(f"127.0.0.1:{port}", 0))
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=dt.timedelta(seconds=30))
    try:
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
    finally:
        dist.destroy_process_group()
    assert ("127.0.0.1", port) in listening  # the rendezvous
    assert len(listening) >= 2  # and gloo's own listener
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening


@needs_ip
def test_loopback_and_plain_interfaces_are_not_wireguard():
    assert wireguard_kind("lo") is None
