"""`iomt broker --config`: a .toml file is BrokerSettings, any other file a Mosquitto config."""
from __future__ import annotations

from pathlib import Path

from device_agent.broker_cli import settle
from iomt.cli import _build_parser


def _args(*argv: str):
    return _build_parser("broker", ["broker", *argv]).parse_args(["broker", *argv])


def test_toml_fills_the_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("IOMT_BROKER_PORT", raising=False)
    path = tmp_path / "broker.toml"
    path.write_text('port = 8883\nhospital = "h1"\nallow_anonymous = true\n')
    args = _args("--config", str(path), "--host", "0.0.0.0")
    settle(args)
    assert (args.port, args.host, args.hospital, args.allow_anonymous, args.config) == (8883, "0.0.0.0", "h1",
                                                                                       True, None)


def test_other_files_stay_mosquitto_configs(tmp_path):
    args = _args("--config", str(tmp_path / "mosquitto.conf"))
    settle(args)
    assert (args.config, args.port, args.host, args.allow_anonymous) == (tmp_path / "mosquitto.conf", 1883,
                                                                         "127.0.0.1", False)
    assert isinstance(args.config, Path)
