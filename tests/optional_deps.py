"""Optional dependencies of the tests: skip when one is not installed, fail when it is installed but broken."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def import_or_skip(name: str, extra: str) -> ModuleType:
    """Import `name`; skip (a failure in strict mode, see conftest.py) only if `name` itself is missing.

    Any other import error (a broken build, a missing system library, a version clash) propagates, so a
    broken install is reported as an error instead of as "not installed".
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is None or not (name == error.name or name.startswith(error.name + ".")):
            raise
        pytest.skip(f"{name} is not installed (the `{extra}` extra: pip install -e '.[{extra}]')")
