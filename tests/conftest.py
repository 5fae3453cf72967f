"""Shared fixtures. Real public images come from ../shared/data (read-only, never copied)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"the real test data is missing: expected {SHARED_DATA} (shared/ beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cxr_dir(shared_data: Path) -> Path:
    return shared_data / "cxr_covid_ieee8023"


@pytest.fixture(scope="session")
def fundus_dir(shared_data: Path) -> Path:
    return shared_data / "fundus_drishti_gs1"


@pytest.fixture(autouse=True)
def console_logging_ends_with_its_command():
    """The handlers a command's ``setup_logging`` gave the root logger are removed after each test. A command
    keeps them for the rest of its process; in a test, CliRunner's stdout they write to is closed when the
    command returns, and a later test's log lines would end in 'Logging error: I/O operation on closed file'.
    (pytest's own capture handlers are subclasses of these and are left alone.)"""
    from rich.logging import RichHandler

    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in before and type(handler) in (logging.StreamHandler, logging.FileHandler, RichHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
