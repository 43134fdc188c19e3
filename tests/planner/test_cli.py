"""The CLI surface: every subcommand answers --help, and a missing command is one line + exit 2."""

from __future__ import annotations

import contextlib
import io

import pytest

from planner.cli.main import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_working_help(command):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"podplan {command}" in out.getvalue()


def test_top_level_help_lists_every_command():
    text = build_parser().format_help()
    for command in COMMANDS:
        assert command in text


def test_no_command_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "COMMAND" in err[0]
