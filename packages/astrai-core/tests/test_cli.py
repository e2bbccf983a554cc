import argparse
import importlib
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

from astrai.cli.version import installed_distributions

cli_main = importlib.import_module("astrai.cli.main")

# Entry points name "module:attr"; make this test module importable under a stable name for them.
HERE = "astrai_core_test_cli_commands"
sys.modules[HERE] = sys.modules[__name__]


def test_version_lists_core(capsys):
    assert cli_main.main(["version"]) == 0
    out = capsys.readouterr().out
    assert "astrai-core" in out and "0.1.0" in out and "python" in out
    assert installed_distributions()["astrai-core"] == "0.1.0"


def test_no_command_prints_help(capsys):
    assert cli_main.main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["--help"])
    assert exc.value.code == 0
    assert "version" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _fake_commands(monkeypatch, *eps):
    monkeypatch.setattr(cli_main, "entry_points", lambda group: list(eps))


def configure_echo(parser: argparse.ArgumentParser) -> None:
    """Echo the given words."""
    parser.add_argument("words", nargs="*")
    parser.set_defaults(run=lambda args: print(" ".join(args.words)) or 0)


def configure_failing(parser: argparse.ArgumentParser) -> None:
    """Fail with a user error."""

    def run(args):
        raise ValueError("bad field 'x'")

    parser.set_defaults(run=run)


def configure_without_run(parser: argparse.ArgumentParser) -> None:
    """A command group with nothing to run."""


def test_entry_point_commands_are_discovered_and_run(monkeypatch, capsys):
    _fake_commands(
        monkeypatch,
        EntryPoint("echo", f"{HERE}:configure_echo", cli_main.COMMAND_GROUP),
        EntryPoint("echo", "elsewhere:duplicate", cli_main.COMMAND_GROUP),  # first one wins
    )
    assert cli_main.main(["echo", "hello", "world"]) == 0
    assert capsys.readouterr().out.strip() == "hello world"
    help_text = cli_main.build_parser().format_help()
    assert "Echo the given words." in help_text


def test_user_error_exits_2_without_traceback(monkeypatch, capsys):
    _fake_commands(monkeypatch, EntryPoint("fail", f"{HERE}:configure_failing", cli_main.COMMAND_GROUP))
    assert cli_main.main(["fail"]) == 2
    assert "astrai fail: error: bad field 'x'" in capsys.readouterr().err


def test_command_without_run_prints_help(monkeypatch, capsys):
    _fake_commands(monkeypatch, EntryPoint("group", f"{HERE}:configure_without_run", cli_main.COMMAND_GROUP))
    assert cli_main.main(["group"]) == 2


def test_broken_entry_point_does_not_break_the_command(monkeypatch, capsys):
    _fake_commands(
        monkeypatch,
        EntryPoint("broken", "astrai_no_such_module:configure", cli_main.COMMAND_GROUP),
        EntryPoint("echo", f"{HERE}:configure_echo", cli_main.COMMAND_GROUP),
    )
    help_text = cli_main.build_parser().format_help()  # loads every command
    assert "Echo the given words." in help_text
    assert "command 'broken'" in capsys.readouterr().err
    assert cli_main.main(["echo", "ok"]) == 0
    assert capsys.readouterr().out.strip() == "ok"


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "astrai.cli", "version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "astrai-core" in proc.stdout


def test_running_a_command_loads_only_its_entry_point(monkeypatch, capsys):
    _fake_commands(
        monkeypatch,
        EntryPoint("broken", "astrai_no_such_module:configure", cli_main.COMMAND_GROUP),
        EntryPoint("echo", f"{HERE}:configure_echo", cli_main.COMMAND_GROUP),
    )
    assert cli_main.main(["echo", "fast"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "fast" and captured.err == ""  # the broken one was never imported
