"""What the ``maskaudit`` command (:mod:`maskaudit.cli`) and its ``reader`` group (:mod:`maskaudit.reader.cli`) share.

:func:`user_errors` turns a :class:`~maskaudit.errors.MaskauditError` into one line and exit code 1
(any other exception keeps its traceback), :func:`setup_logging` sends the log to the console and
the run's log file, :func:`writer_lock` holds a run directory's writer lock (:mod:`maskaudit.lock`).

Both command modules import it at the top, so it stays as light as they must be: standard
library, typer, rich, :mod:`maskaudit.errors` and :mod:`maskaudit.lock` only
(``tests/test_cli_fast.py``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer

from maskaudit.errors import MaskauditError, disk_error
from maskaudit.lock import command_line, run_lock


def setup_logging(log_file: Path | None) -> None:
    """Log INFO and above to the console (rich on a terminal, plain lines otherwise) and to ``log_file``.

    Replaces the root logger's handlers; a ``log_file`` that cannot be created is a one-line
    :class:`~maskaudit.errors.DiskError` when the file system refused it.
    """
    from rich.logging import RichHandler  # rich's logging (with its tracebacks, pygments) only when it is used

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    if sys.stdout.isatty():
        console: logging.Handler = RichHandler(show_path=False, show_time=False, markup=False)
    else:  # a file, a pipe, CI: one plain line per message, never wrapped
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    console.setLevel(logging.INFO)
    root.addHandler(console)
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file)
        except OSError as exc:  # a read-only run directory: one line, not a traceback
            raise disk_error(exc, log_file) or exc from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user's error (:class:`MaskauditError`) in one line and exit 1; bugs keep their traceback.

    Ctrl+C prints one line too and exits 130. Any other exception is not caught here: it leaves
    the command with its full traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MaskauditError as exc:
            typer.echo(f"error: {' '.join(str(exc).splitlines())}", err=True)  # one line, always
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: run the same command again to continue where it stopped", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def command() -> str:
    """This command as typed, which a second writer is shown: ``maskaudit train --out runs/x``."""
    context = click.get_current_context(silent=True)
    return command_line(context.command_path if context is not None else "maskaudit")


def writer_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """The run directory's writer lock, held by this command (:func:`maskaudit.lock.run_lock`)."""
    return run_lock(out, command())
