"""Hosts for multi-host tests: one network namespace per host, all on one bridge (the "network"),
WireGuard between some of them with deploy/wireguard/mpc-wg.sh, and per-host name resolution
(``/etc/netns/<ns>/hosts``, which ``ip netns exec`` puts in place of ``/etc/hosts``).

Needs root and iproute2; WireGuard needs wireguard-tools and the kernel's module or
wireguard-go with /dev/net/tun. :func:`why_not` says what is missing.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from iomt.supervisor import REPO_ROOT, die_with_parent, stop

WG_SCRIPT = REPO_ROOT / "deploy" / "wireguard" / "mpc-wg.sh"
WG_PORT = 51820
NETNS_ETC = Path("/etc/netns")


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def wait(cond: Callable[[], bool], what: str, timeout: float = 30.0, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise TimeoutError(f"{what} not up within {timeout:.0f}s")


def kernel_wireguard(ns: str) -> bool:
    return sh("ip", "netns", "exec", ns, "ip", "link", "add", "wgchk", "type", "wireguard", check=False).returncode == 0


def why_not(tools: Sequence[str] = ("ip",), wireguard: bool = False) -> str | None:
    """Why these tests cannot run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"iomtchk{os.getpid() % 10000}"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "cannot create network namespaces (ip netns add)"
    try:
        kernel = kernel_wireguard(probe)
    finally:
        sh("ip", "netns", "del", probe, check=False)
    if wireguard and not kernel and (shutil.which("wireguard-go") is None or not Path("/dev/net/tun").exists()):
        return "no WireGuard: the kernel lacks it and wireguard-go (with /dev/net/tun) is not available"
    return None


class Hosts:
    """Namespaces named after ``members`` on one bridge; ``address[m]`` is m's address as
    ``ADDR/PREFIX`` (default: ``10.N.0.i/24``). Every address gets an on-link route, so hosts on
    different subnets reach each other across the bridge as on one switch."""

    def __init__(self, work: Path, members: Sequence[str], address: Mapping[str, str] | None = None) -> None:
        self.tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        self.net = random.randrange(100, 250, 2)
        self.members = list(members)
        self.bridge = f"ib{self.tag}"
        self.ns = {m: f"iomt{self.tag}{i}" for i, m in enumerate(members)}
        self.cidr = dict(address) if address else {m: f"10.{self.net}.0.{i + 1}/24" for i, m in enumerate(members)}
        self.under = {m: c.split("/")[0] for m, c in self.cidr.items()}
        self.wg: dict[str, str] = {}
        #: the pid whose mount namespace holds m's private /run/wireguard (wireguard-go only)
        self.mnt: dict[str, int] = {}
        self.work = work
        self.daemons: list[subprocess.Popen] = []

    def up(self) -> Hosts:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        subnets = {self._subnet(c) for c in self.cidr.values()}
        for m in self.members:
            ns, veth = self.ns[m], f"v{self.tag}{self.members.index(m)}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge)
            sh("ip", "link", "set", veth, "up")
            self.exec(m, "ip", "link", "set", "lo", "up")
            self.exec(m, "ip", "link", "set", "eth0", "up")
            self.exec(m, "ip", "addr", "add", self.cidr[m], "dev", "eth0")
            for subnet in subnets - {self._subnet(self.cidr[m])}:
                self.exec(m, "ip", "route", "add", subnet, "dev", "eth0")
        return self

    @staticmethod
    def _subnet(cidr: str) -> str:
        import ipaddress
        return str(ipaddress.ip_interface(cidr).network)

    def add_root_address(self, cidr: str) -> None:
        """Give the test process (the root namespace) an address on the bridge."""
        sh("ip", "addr", "add", cidr, "dev", self.bridge)

    def exec(self, m: str, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns[m], *cmd, check=check, timeout=timeout)

    def argv(self, m: str, *cmd: str) -> list[str]:
        """``cmd`` run on host m: its network namespace, its /etc/hosts and, with wireguard-go,
        the mount namespace that sees its interface's control socket."""
        if m in self.mnt:
            return ["nsenter", f"--mount=/proc/{self.mnt[m]}/ns/mnt", f"--net=/run/netns/{self.ns[m]}", *cmd]
        return ["ip", "netns", "exec", self.ns[m], *cmd]

    def hosts_file(self, m: str, names: Mapping[str, str]) -> None:
        """Name resolution inside m: ``names`` (host name -> address) in its own /etc/hosts."""
        folder = NETNS_ETC / self.ns[m]
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{addr} {name}" for name, addr in names.items())]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def wireguard(self, members: Sequence[str], tunnel: Mapping[str, str], iface: str | Callable[[str], str]) -> None:
        """A WireGuard mesh between ``members`` (``tunnel[m]``: ``ADDR/PREFIX``), each brought up with
        deploy/wireguard/mpc-wg.sh from a wg-mpc.conf.template filled in.

        ``iface`` names each member's interface. With the kernel's WireGuard that is all; with
        wireguard-go (whose control sockets all live in /run/wireguard) each member's daemon
        runs in a mount namespace of its own with a private /run/wireguard, so every host can
        call its interface ``wg0`` as on separate machines; :meth:`argv` runs commands there.
        """
        name = iface if callable(iface) else (lambda m: iface)
        keys = {}
        for m in members:
            key = sh("wg", "genkey").stdout.strip()
            pub = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True, check=True).stdout.strip()
            keys[m] = (key, pub)
        kernel = kernel_wireguard(self.ns[members[0]])
        for m in members:
            conf = self.work / f"wg-{m}.conf"
            lines = ["[Interface]", f"PrivateKey = {keys[m][0]}", f"ListenPort = {WG_PORT}"]
            for peer in members:
                if peer != m:
                    lines += ["", "[Peer]", f"PublicKey = {keys[peer][1]}",
                              f"AllowedIPs = {tunnel[peer].split('/')[0]}/32",
                              f"Endpoint = {self.under[peer]}:{WG_PORT}"]
            conf.write_text("\n".join(lines) + "\n")
            conf.chmod(0o600)
            self.wg[m] = wg = name(m)
            if kernel:
                self.exec(m, "sh", str(WG_SCRIPT), "up", wg, tunnel[m], str(conf))
                continue
            ready = self.work / f"wg-{m}.ready"
            script = (f"mkdir -p /run/wireguard && mount -t tmpfs -o mode=0700 tmpfs /run/wireguard && "
                      f"{{ wireguard-go -f {wg} & }} && "
                      f"until wg show {wg} >/dev/null 2>&1; do sleep 0.1; done && "
                      f"sh {WG_SCRIPT} up {wg} {tunnel[m]} {conf} > {self.work}/wg-{m}.log 2>&1 && "
                      f"touch {ready} && wait")
            env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
            self.daemons.append(subprocess.Popen(
                self.argv(m, "unshare", "--mount", "--propagation", "private", "sh", "-c", script), env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent))
            wait(lambda: ready.exists() or self.daemons[-1].poll() is not None, f"wireguard-go in {m}")
            if not ready.exists():
                raise RuntimeError(f"WireGuard in {m} failed: {(self.work / f'wg-{m}.log').read_text(errors='replace')}")
            self.mnt[m] = self.daemons[-1].pid  # ip netns exec and unshare exec: the shell has this pid

    def down(self) -> None:
        for m in self.members:
            sh("ip", "netns", "del", self.ns[m], check=False)
            shutil.rmtree(NETNS_ETC / self.ns[m], ignore_errors=True)
        for proc in self.daemons:
            stop(proc)
        sh("ip", "link", "del", self.bridge, check=False)
