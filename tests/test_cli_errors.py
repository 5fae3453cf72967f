"""A user's error is one line and exit code 1; any other exception (a bug) keeps its full traceback.

:func:`maskaudit.cli_common.user_errors` wraps every command of ``maskaudit`` and of ``maskaudit reader``.
The commands run in a subprocess here, as a user runs them, with the command's work replaced by a
function that raises.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maskaudit.cli import app

RAISE = """
import maskaudit.runstatus
from maskaudit.errors import MaskauditError
from maskaudit.cli import app

def show_status(run_dir):
    raise {error}

maskaudit.runstatus.show_status = show_status
app(["status", "somewhere"], prog_name="maskaudit")
"""


def _status_raising(error: str) -> subprocess.CompletedProcess:
    """``maskaudit status somewhere`` whose work raises ``error`` (Python source of the exception)."""
    code = textwrap.dedent(RAISE).format(error=error)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_user_error_is_one_line_and_exit_1():
    done = _status_raising('MaskauditError("the config is wrong\\nin two places")')
    assert done.returncode == 1
    assert done.stderr == "error: the config is wrong in two places\n"
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("error", [f'{kind}("an internal invariant broke")'
                                   for kind in ("RuntimeError", "ValueError", "TypeError", "KeyError")])
def test_a_bug_keeps_its_traceback(error: str):
    done = _status_raising(error)
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert "an internal invariant broke" in done.stderr
    assert "show_status" in done.stderr  # the frame that raised is shown
    assert not any(line.startswith("error: ") for line in done.stderr.splitlines())


def test_a_bug_is_not_caught_by_the_command(monkeypatch):
    import maskaudit.runstatus

    def broken(run_dir):
        raise RuntimeError("boom")

    monkeypatch.setattr(maskaudit.runstatus, "show_status", broken)
    result = CliRunner().invoke(app, ["status", "somewhere"])
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "boom"


def test_reader_commands_report_user_errors_in_one_line(tmp_path: Path):
    result = CliRunner().invoke(app, ["reader", "analyse", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "reader create" in lines[0]
