"""`iomt edge federate --config`: the file fills what no flag or IOMT_FEDERATE_* gives."""
from __future__ import annotations

from edge_server.federation.client import _settle
from iomt.cli import _build_parser


def _args(*argv: str):
    argv = ("edge", "federate", *argv)
    return _build_parser("edge", list(argv)).parse_args(list(argv))


def test_flag_env_file_default(tmp_path, monkeypatch):
    path = tmp_path / "federate.toml"
    path.write_text('data_dir = "/srv/edge"\ncoordinator = "https://c:8790"\nepochs = 3\nepsilon = 4.0\n'
                    'model_config_file = "m.json"\n')
    monkeypatch.setenv("IOMT_FEDERATE_EPOCHS", "5")
    args = _args("--config", str(path), "--epsilon", "2")
    _settle(args)
    assert (args.data_dir, args.coordinator, args.model_config) == ("/srv/edge", "https://c:8790", "m.json")
    assert (args.epochs, args.epsilon, args.delta, args.dp, args.seed) == (5, 2.0, 1e-5, "sgd", 0)


def test_without_config_the_defaults_are_the_old_ones(monkeypatch):
    monkeypatch.delenv("IOMT_FEDERATE_EPOCHS", raising=False)
    args = _args("--data-dir", "d")
    _settle(args)
    assert (args.epochs, args.seed, args.dp, args.epsilon, args.delta, args.image_encoder, args.fusion) == (
        1, 0, "sgd", 8.0, 1e-5, "cnn", "attention")
