from tests.utils.procs import run_iomt


def test_help_lists_every_role():
    out = run_iomt("--help").stdout
    for command in ("broker", "device", "simulate", "edge", "cloud", "infer", "demo", "experiment"):
        assert command in out


def test_unknown_command_fails():
    proc = run_iomt("no-such-command", check=False)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
