"""protocols.config: TOML file < environment < explicit flags; unknown keys and missing settings fail clearly."""
from __future__ import annotations

import logging

import pytest

from cloud_aggregator.settings import CoordinatorSettings, PartySettings
from iomt.cli import log_level, main
from protocols.config import load_settings
from protocols.errors import ConfigError

PARTY = """index = 1
parties = 2
data_dir = "/var/lib/iomt/party"
registry = "/etc/iomt/creds/registry.json"
port = 8801
"""


@pytest.fixture
def party_toml(tmp_path, monkeypatch):
    for name in ("IOMT_PARTY_PORT", "IOMT_PARTY_INDEX", "IOMT_PARTY_HOST"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "party.toml"
    path.write_text(PARTY)
    return path


def test_file_alone(party_toml):
    s = load_settings(PartySettings, party_toml)
    assert (type(s), s.index, s.port, s.host) == (PartySettings, 1, 8801, "127.0.0.1")


def test_env_beats_file_and_flag_beats_env(party_toml, monkeypatch):
    monkeypatch.setenv("IOMT_PARTY_PORT", "8802")
    assert load_settings(PartySettings, party_toml).port == 8802
    assert load_settings(PartySettings, party_toml, {"port": 8803, "host": None}).port == 8803


def test_flags_not_given_leave_the_file_alone(party_toml):
    s = load_settings(PartySettings, party_toml, {"index": None, "mpc_insecure": None})
    assert (s.index, s.mpc_insecure) == (1, False)


def test_unknown_key_is_named(party_toml):
    party_toml.write_text(PARTY + "prot = 9000\n")
    with pytest.raises(ConfigError, match=r"unknown key 'prot' in .*party.toml"):
        load_settings(PartySettings, party_toml)


def test_missing_setting_names_the_flag(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('data_dir = "/x"\n')
    with pytest.raises(ConfigError, match="party_urls is required: give --party"):
        load_settings(CoordinatorSettings, path, flag_names={"party_urls": "--party"})


@pytest.mark.parametrize("text", ["index = ", "index = 1\nindex = 2\n"])
def test_malformed_toml(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(PartySettings, path)


@pytest.mark.parametrize("argv", [["cloud", "party"], ["cloud", "coordinator"], ["cloud", "triples"],
                                  ["edge", "run"], ["edge", "web"], ["edge", "federate"], ["broker"], ["device"]])
def test_cli_unknown_key_exits_2(tmp_path, argv, caplog):
    path = tmp_path / "role.toml"
    path.write_text("no_such_key = 1\n")
    with caplog.at_level(logging.ERROR):
        assert main([*argv, "--config", str(path)]) == 2
    assert "unknown key 'no_such_key'" in caplog.text


def test_services_log_info_commands_warning():
    assert log_level("cloud", "party", 0) == logging.INFO
    assert log_level("edge", "run", 0) == logging.INFO
    assert log_level("broker", None, 0) == logging.INFO
    assert log_level("edge", "status", 0) == logging.WARNING
    assert log_level("infer", None, 0) == logging.WARNING
    assert log_level("simulate", None, 1) == logging.INFO
    assert log_level("cloud", "party", 3) == logging.DEBUG
