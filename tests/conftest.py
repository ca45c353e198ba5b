"""Shared pytest fixtures: the real data under ../shared/data and the `slow` marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavier tests (full-size media, subprocesses); deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder: $MULTIMOOD_TEST_DATA, else <repo>/../shared/data; skips when absent."""
    path = Path(os.environ.get("MULTIMOOD_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path} (set MULTIMOOD_TEST_DATA)")
    return path
