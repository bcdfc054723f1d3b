"""deploy/firewall: one nftables file per host of deploy/config; each loads (twice: a reload replaces
it) and drops by default. What the rules let through is proven by tests/deploy/test_multihost.py."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TABLES = sorted((DEPLOY / "firewall").glob("*.nft"))


def test_a_table_per_host():
    assert {p.stem for p in TABLES} == {p.name for p in (DEPLOY / "config").iterdir() if p.is_dir()}


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_table_is_one_table_dropping_by_default(path):
    text = path.read_text()
    assert text.count("policy drop;") == 2  # input and forward
    assert "table inet iomt\ndelete table inet iomt\n" in text
    assert "tcp dport 22 ip saddr $admin accept" in text


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
                    reason="needs root, nft and ip (loads each table in a scratch network namespace)")
@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_table_loads_and_reloads(path):
    ns = f"iomtfw{os.getpid() % 100000}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("cannot create network namespaces")
    try:
        for _ in range(2):
            done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", str(path)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        listed = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True,
                                text=True, check=True).stdout
        assert listed.count("table inet iomt") == 1 and "policy drop" in listed
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
