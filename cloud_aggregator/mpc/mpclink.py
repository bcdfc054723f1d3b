"""The MPC link: the address a party (or the triples provider) uses for its CrypTen group,
the check that the link is protected before joining, and binding to that address only.

What crosses the link: torch.distributed (gloo) over plain TCP carries the seeds of every
party's triple generator (sent by the triples provider at start-up), the triple shares the
provider deals to party 0, the pairwise PRZS seeds, and the masked openings of every secret
multiplication. An observer of those bytes can regenerate the triples and unmask the
openings, i.e. recover queries and model weights. This torch build's gloo has no TLS
transport (only ``TCP``; it was built without ``USE_TCP_OPENSSL_LINK``/``LOAD``), so the
link must run inside an encrypted, authenticated tunnel: WireGuard, set up by the
deployment (``deploy/wireguard/``). Before joining, :func:`check_link` verifies it:

* **loopback** (the MPC address and the rendezvous both on 127.0.0.0/8 or ::1): allowed
  without a tunnel, logged at INFO; every process of the group is on this host and no link
  leaves it (the demo and the tests);
* otherwise the MPC address must sit on ``--mpc-interface``, that interface must be a
  WireGuard interface (kernel, or userspace wireguard-go) with at least one peer (when
  ``wg show`` may list them: it needs CAP_NET_ADMIN), and (ranks other than 0) the route to
  the rendezvous must leave through it;
* ``--mpc-insecure`` (development only) joins anyway and logs a WARNING saying why the link
  is unprotected.

:func:`bind_distributed` then makes both listeners bind the MPC address only: gloo's (its
random port, through ``GLOO_SOCKET_IFNAME``) and party 0's rendezvous store (a
``TCPStore`` built on a socket bound to the address; torch's ``tcp://`` rendezvous would
listen on every interface).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

from protocols.errors import ConfigError
from protocols.netaddr import is_loopback

log = logging.getLogger(__name__)

#: How long a command that inspects the host's interfaces may take (seconds).
TOOL_TIMEOUT_S = 10.0
#: Linux's loopback interface (it holds all of 127.0.0.0/8 and ::1).
LOOPBACK_INTERFACE = "lo"


class MpcLinkError(ConfigError):
    """The MPC link is not configured or not protected; the party refuses to join."""


@dataclass(frozen=True)
class MpcLink:
    """Where one member of the MPC group listens, and how its link is protected."""

    master: str  # host:port of party 0's rendezvous
    address: str  # this member's MPC address (its listeners bind here only)
    interface: str  # the network interface holding ``address``
    protection: str  # "loopback", "wireguard" or "insecure"

    @property
    def master_host(self) -> str:
        return split_master(self.master)[0]

    @property
    def master_port(self) -> int:
        return split_master(self.master)[1]


def split_master(master: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); MpcLinkError when malformed."""
    host, sep, port = master.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MpcLinkError(f"mpc master must be HOST:PORT, got {master!r}")
    return host, int(port)


def _ip(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as err:
        raise MpcLinkError(f"cannot resolve MPC host {host!r}: {err}") from err


def _ip_json(*args: str) -> list[dict]:
    if shutil.which("ip") is None:
        raise MpcLinkError("the `ip` command (iproute2) is needed to check the MPC interface")
    try:
        out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MpcLinkError(f"`ip {' '.join(args)}` failed: {err}") from err
    if out.returncode != 0:
        raise MpcLinkError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()[:200]}")
    return json.loads(out.stdout or "[]")


def interface_addresses() -> dict[str, list[str]]:
    """Every interface of this host (network namespace) and its IP addresses."""
    return {link["ifname"]: [a["local"] for a in link.get("addr_info", []) if "local" in a]
            for link in _ip_json("addr", "show")}


#: Where userspace WireGuard (wireguard-go, boringtun) puts an interface's control socket.
WG_SOCKET_DIR = "/var/run/wireguard"


def wireguard_kind(interface: str) -> str | None:
    """"kernel" or "userspace" for a WireGuard interface, else None (no privileges needed)."""
    links = _ip_json("-d", "link", "show", "dev", interface)
    kind = (links[0].get("linkinfo") or {}).get("info_kind") if links else None
    if kind == "wireguard":
        return "kernel"
    if kind == "tun" and os.path.exists(os.path.join(WG_SOCKET_DIR, f"{interface}.sock")):
        return "userspace"
    return None


def wireguard_peers(interface: str) -> list[str] | None:
    """Public keys of the interface's WireGuard peers; None when ``wg`` cannot tell (it needs
    CAP_NET_ADMIN, or wireguard-tools is not installed)."""
    if shutil.which("wg") is None:
        return None
    try:
        out = subprocess.run(["wg", "show", interface, "peers"], capture_output=True, text=True,
                             timeout=TOOL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.split() if out.returncode == 0 else None


def route_interface(dst: str) -> str | None:
    """The interface this host uses to reach ``dst``."""
    routes = _ip_json("route", "get", dst)
    return routes[0].get("dev") if routes else None


def resolve_link(master: str, rank: int, address: str | None = None, interface: str | None = None,
                 insecure: bool = False) -> MpcLink:
    """Work out and check this member's MPC address and interface; MpcLinkError to refuse.

    ``rank`` 0 hosts the rendezvous, so its address is the master's host. Without
    ``address`` the interface's first address is used; without either, loopback when the
    master is on loopback. See the module docstring for the rule on protection."""
    master_ip = _ip(split_master(master)[0])
    if interface is None and is_loopback(master_ip) and (address is None or is_loopback(_ip(address))):
        address = _ip(address) if address else master_ip
        if rank == 0 and address != master_ip:
            raise MpcLinkError(f"party 0 hosts the rendezvous: its MPC address {address} must be the "
                               f"mpc master's host {master_ip}")
        log.info("MPC link on loopback (%s): every member is on this host, no tunnel needed", address)
        return MpcLink(master, address, LOOPBACK_INTERFACE, "loopback")
    addrs = interface_addresses()
    if address is None and interface is not None:
        if interface not in addrs:
            raise MpcLinkError(f"MPC interface {interface!r} does not exist on this host")
        family = 4 if ipaddress.ip_address(master_ip).version == 4 else 6
        own = [a for a in addrs[interface] if ipaddress.ip_address(a).version == family]
        if not own:
            raise MpcLinkError(f"MPC interface {interface!r} has no IPv{family} address")
        address = own[0]
    if address is None:
        if rank == 0 or is_loopback(master_ip):
            address = master_ip
        else:
            raise MpcLinkError("set --mpc-interface (e.g. wg0) or --mpc-address for a rendezvous off this host")
    address = _ip(address)
    if rank == 0 and address != master_ip:
        raise MpcLinkError(f"party 0 hosts the rendezvous: its MPC address {address} must be the "
                           f"mpc master's host {master_ip}")
    holders = [name for name, ips in addrs.items() if address in ips]
    if not holders:
        raise MpcLinkError(f"MPC address {address} is not an address of this host")
    if interface is None:
        interface = holders[0]
    elif interface not in holders:
        raise MpcLinkError(f"MPC address {address} is not on interface {interface!r} (it is on {holders[0]})")
    if is_loopback(address) and is_loopback(master_ip):
        log.info("MPC link on loopback (%s): every member is on this host, no tunnel needed", address)
        return MpcLink(master, address, interface, "loopback")
    problem = _tunnel_problem(interface, master_ip, rank)
    if problem is None:
        log.info("MPC link %s on WireGuard interface %s", address, interface)
        return MpcLink(master, address, interface, "wireguard")
    if insecure:
        log.warning("MPC link is NOT protected (%s); joining anyway because --mpc-insecure was given: "
                    "an observer of this link can recover the secret inputs", problem)
        return MpcLink(master, address, interface, "insecure")
    raise MpcLinkError(f"refusing to join the MPC group: {problem}. The MPC link carries the triple "
                       "seeds in clear; run it over WireGuard (deploy/wireguard/), or pass --mpc-insecure "
                       "for development only")


def _tunnel_problem(interface: str, master_ip: str, rank: int) -> str | None:
    if wireguard_kind(interface) is None:
        return f"interface {interface!r} is not a WireGuard interface"
    peers = wireguard_peers(interface)
    if peers is None:
        log.info("cannot list the peers of %s (`wg show` needs CAP_NET_ADMIN); checked its type and route", interface)
    elif not peers:
        return f"WireGuard interface {interface!r} has no peers"
    if rank != 0:
        via = route_interface(master_ip)
        if via != interface:
            return f"the route to the rendezvous {master_ip} leaves through {via!r}, not {interface!r}"
    return None


def bind_distributed(link: MpcLink) -> None:
    """Make this process's torch.distributed listeners bind ``link.address`` only.

    Sets ``GLOO_SOCKET_IFNAME`` (gloo's peer listener and the address it advertises) and
    makes ``init_process_group(init_method="tcp://...")`` use a rendezvous store whose
    server socket (rank 0) is bound to the MPC address instead of every interface."""
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = link.interface
    original = getattr(dist.init_process_group, "_iomt_original", dist.init_process_group)

    def init_bound(*args: Any, **kwargs: Any) -> Any:
        init_method = kwargs.get("init_method")
        if kwargs.get("store") is None and isinstance(init_method, str) and init_method.startswith("tcp://"):
            kwargs.pop("init_method")
            timeout = kwargs.get("timeout") or dt.timedelta(minutes=30)
            kwargs["store"] = _store(link, int(kwargs["rank"]), int(kwargs["world_size"]), timeout)
        return original(*args, **kwargs)

    init_bound._iomt_original = original
    dist.init_process_group = init_bound


def _store(link: MpcLink, rank: int, world_size: int, timeout: dt.timedelta) -> Any:
    import torch.distributed as dist

    if rank != 0:
        return dist.TCPStore(link.master_host, link.master_port, world_size, False, timeout)
    family = socket.AF_INET6 if ipaddress.ip_address(link.address).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((link.address, link.master_port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise MpcLinkError(f"cannot listen on {link.address}:{link.master_port} for the rendezvous: {err}") from err
    return dist.TCPStore(link.master_host, link.master_port, world_size, True, timeout,
                         wait_for_workers=False, master_listen_fd=sock.detach())


def add_mpc_link_arguments(parser: Any) -> None:
    """``--mpc-address``, ``--mpc-interface``, ``--mpc-insecure`` (party and triples provider)."""
    parser.add_argument("--mpc-interface", help="network interface of the MPC link, e.g. wg0 (must be WireGuard "
                                                "unless the link is loopback-only)")
    parser.add_argument("--mpc-address", help="this host's MPC address; the MPC listeners bind it only "
                                              "(default: the interface's first address)")
    parser.add_argument("--mpc-insecure", action="store_true", default=None,
                        help="development only: join over an unprotected MPC link (logs a WARNING)")

