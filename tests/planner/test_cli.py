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


def _errors() -> list[Exception]:
    """One of every podplan error, wherever it lives (each with the package that owns its concept)."""
    from costmodels.errors import InfeasibleError, InputError, TopologyError
    from passes.errors import LintError, MetadataError, PassError, UnsupportedModelError
    from planner.frontend.errors import ConfigError
    from planner.ir.errors import PlanError
    from planner.ir.plan import PlanValidationError

    plain = [InputError, TopologyError, InfeasibleError, PlanError, ConfigError, PassError, LintError, MetadataError,
             UnsupportedModelError]
    return [cls("subject: the broken rule; the fix") for cls in plain] + [PlanValidationError(".x", "the broken rule")]


@pytest.mark.parametrize("error", _errors(), ids=lambda e: type(e).__name__)
def test_every_podplan_error_is_one_line_exit_2(monkeypatch, capsys, error):
    import planner.cli.models as models

    def fail(args):
        raise error

    monkeypatch.setattr(models, "run", fail)
    assert main(["models"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("podplan models: error: ") and "the broken rule" in err[0]


@pytest.mark.parametrize("command", ["compile", "estimate"])
def test_topology_help_comes_from_the_registry(command):
    from costmodels.topology import FAMILIES

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(out.getvalue().split())
    assert all(f.usage in text for f in FAMILIES)
