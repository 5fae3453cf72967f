"""The CLI answers at once: importing it loads no heavy library, and every command's --help works (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from maskaudit import cli

HEAVY = ["torch", "torchvision", "numpy", "pandas", "matplotlib", "scipy", "sklearn", "shap", "cv2", "fastapi",
         "uvicorn", "maskaudit.pipeline", "maskaudit.reader.app"]


def test_import_loads_nothing_heavy():
    code = f"import json, sys, maskaudit.cli; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


def _commands(group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every command and group under ``group`` (typer's click group), the group's own first."""
    found = [path]
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found += _commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


COMMANDS = _commands(typer.main.get_command(cli.app))


def test_every_command_is_listed():
    expected = {"run", "probe", "demo", "check", "prepare", "split", "train", "predict", "metrics", "analyse",
                "report", "status", "reader", "reader create", "reader serve", "reader analyse"}
    assert {" ".join(c) for c in COMMANDS if c} == expected


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "maskaudit")
def test_help(command: tuple[str, ...]):
    result = CliRunner().invoke(cli.app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
