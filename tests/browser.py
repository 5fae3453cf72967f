"""Debian's chromium driven by Playwright (never `playwright install`), shared by the browser tests.

In CI (``CI`` set) chromium and playwright are installed by .ci/run and the test extra: their absence
fails the test. Elsewhere a missing one skips it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
LAUNCH_ARGS = ["--no-sandbox"]


def playwright_api() -> ModuleType:
    """``playwright.sync_api``, after checking that chromium is there (fail in CI, skip elsewhere)."""
    if os.environ.get("CI"):
        from playwright import sync_api

        assert CHROMIUM is not None, "no chromium binary in CI: .ci/run should have installed Debian's chromium"
        return sync_api
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    if CHROMIUM is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium; .ci/run installs it)")
    return sync_api
