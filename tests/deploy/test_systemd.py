"""deploy/systemd: every unit passes `systemd-analyze verify`, runs as iomt with hardening, reads its TOML."""
from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "systemd").glob("*.service"))
IOMT = "/opt/iomt/venv/bin/iomt"
ANALYZE = shutil.which("systemd-analyze")


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read(path)
    return parser


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_units_verify(tmp_path):
    # verify refuses a unit whose ExecStart binary is missing; the venv exists only on a
    # deployed host, so the copies point at a stand-in executable (everything else unchanged)
    stand_in = tmp_path / "iomt"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(IOMT, str(stand_in)))
        copies.append(str(copy))
    done = subprocess.run([ANALYZE, "verify", "--man=no", *copies], capture_output=True, text=True, timeout=120)
    # unknown keys and bad values are only warnings (exit 0): any output is a failure
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_runs_hardened_as_iomt_from_its_config(path):
    unit = _unit(path)
    svc = unit["Service"]
    role = path.stem.removeprefix("iomt-")
    assert svc["User"] == "iomt"
    assert svc["ExecStart"].startswith(IOMT + " ")
    assert svc["ExecStart"].endswith(f"--config /etc/iomt/{role}.toml")
    assert svc["StateDirectory"].startswith("iomt/")
    assert svc["ConfigurationDirectory"] == "iomt"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "", "Restart": "on-failure",
                       "SystemCallFilter": "@system-service"}.items():
        assert svc[key] == value, key
    assert "2" in svc["RestartPreventExitStatus"].split()
    assert "network-online.target" in unit["Unit"]["After"] and unit["Unit"]["Wants"] == "network-online.target"
