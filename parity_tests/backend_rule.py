"""What a missing backend means, in one place: the parity matrix (test_parity.py), the
backend-parametrised suite (tests/backends) and every other test that needs a framework or an
optional package (tests/) decide through `missing_backend`.

- Under CI (`CI=true`) a missing backend is a failure, always.
- Elsewhere it is a failure too, unless the run passes `--allow-missing-backend` (registered in
  the repository-root conftest.py): then the test is skipped, naming what is missing and why.

No framework is imported here (the module loads in both .venv and .venv-mge).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def strict() -> bool:
    """Under CI a missing backend is a failure, never a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_backend(config: pytest.Config, reason: str) -> NoReturn:
    """End the running test because a backend it needs is unavailable (`reason` says which and
    why): a failure under CI or without --allow-missing-backend, a skip otherwise."""
    if strict():
        pytest.fail(f"{reason} (under CI a missing backend is a failure)")
    if not config.getoption("--allow-missing-backend"):
        pytest.fail(f"{reason} (pass --allow-missing-backend to skip instead)")
    pytest.skip(reason)


def require_module(config: pytest.Config, name: str) -> ModuleType:
    """`importlib.import_module(name)`, or `missing_backend` when it cannot be imported (the rule's
    replacement for pytest.importorskip, which skips even under CI)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing_backend(config, f"{name} cannot be imported here: {type(e).__name__}: {e}")
