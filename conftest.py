"""Shared pytest options: `--slow` selects the long hypothesis profile and slow-marked tests;
`--allow-missing-backend` lets a test skip, instead of fail, when a backend it needs (torch,
flax, MegEngine through its worker in .venv-mge, onnx...) cannot start here (never under CI=true;
the rule: parity_tests/backend_rule.py, used by the parity matrix and by tests/). Registered
here, not in parity_tests/conftest.py, so that the option is known to every pytest run that
scripts/test.sh passes its arguments to."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "slow", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="long hypothesis profile and slow tests")
    parser.addoption(
        "--allow-missing-backend",
        action="store_true",
        help="skip (not fail) tests whose backend is unavailable; ignored under CI=true",
    )


def pytest_configure(config: pytest.Config) -> None:
    settings.load_profile("slow" if config.getoption("--slow") else "ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --slow, slow-marked tests are deselected (reported as deselected, not skipped:
    a skip in CI would read as something that could not run)."""
    if config.getoption("--slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]
