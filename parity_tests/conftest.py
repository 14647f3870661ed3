"""Session-wide runners: torch and flax in process, MegEngine through one worker.

`runners` holds the backends that started; `missing_backends` the reason for each that did not.
What a missing backend means (a failure, or with `--allow-missing-backend` a skip) is decided in
test_parity.py; the option itself is registered in the repository-root conftest.py.
"""

from __future__ import annotations

import pytest

from .harness import make_runners


@pytest.fixture(scope="session")
def _backends() -> tuple[dict, dict[str, str]]:
    return make_runners()


@pytest.fixture(scope="session")
def runners(_backends) -> dict:
    return _backends[0]


@pytest.fixture(scope="session")
def missing_backends(_backends) -> dict[str, str]:
    return _backends[1]
