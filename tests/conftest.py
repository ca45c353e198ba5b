"""Shared pytest set-up: the real data under ../shared/data, the `slow` marker, and strict mode for CI.

A developer without the real data (or without an optional extra) gets skips with the reason. In CI
(`MULTIMOOD_TEST_STRICT=1`, exported by `.ci/run`, or `CI=true`) every skip is turned into a failure
that keeps the reason: a missing data folder or a broken optional import must not pass silently. The
one exception is hardware: on a machine without CUDA, strict mode deselects the `gpu` tests (the header
says how many and why) instead of failing them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def strict_mode() -> bool:
    """True in CI: skips become failures."""
    return os.environ.get("MULTIMOOD_TEST_STRICT", "") == "1" or os.environ.get("CI", "").lower() == "true"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: heavier tests (full-size media, subprocesses); deselect with -m 'not slow'"
    )


def pytest_report_header(config):
    if strict_mode():
        return "multimood strict mode (MULTIMOOD_TEST_STRICT=1 or CI=true): skips are failures"
    return None


def pytest_collection_modifyitems(config, items):
    """Strict mode without CUDA: deselect the `gpu` tests (they need hardware this machine lacks)."""
    if not strict_mode() or torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.hook.pytest_deselected(items=gpu)
        config.get_terminal_writer().line(
            f"multimood strict mode: {len(gpu)} gpu tests deselected (CUDA is not available)"
        )


def _as_failure(report, where: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped {where} in strict mode (MULTIMOOD_TEST_STRICT=1 / CI=true), reason: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if strict_mode() and report.skipped and not hasattr(report, "wasxfail"):
        _as_failure(report, "test")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if strict_mode() and report.skipped:  # a module-level importorskip
        _as_failure(report, "module")
    return report


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder: $MULTIMOOD_TEST_DATA, else <repo>/../shared/data; skips when absent (fails in CI)."""
    path = Path(os.environ.get("MULTIMOOD_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path} (set MULTIMOOD_TEST_DATA)")
    return path


@pytest.fixture(scope="module")
def video_folder(shared_data) -> str:
    """The folder of the real clips."""
    return str(shared_data / "media" / "video")


@pytest.fixture(scope="module")
def records(shared_data) -> list[dict]:
    """The 445 real MESC validation records as read from the file (a fresh list for each test module)."""
    with open(shared_data / "records" / "mesc_val_records.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
