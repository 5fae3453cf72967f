"""Shared fixtures. Real public images come from ../shared/data (read-only, never copied)."""

from __future__ import annotations

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
