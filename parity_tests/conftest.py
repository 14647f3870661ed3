"""Session-wide runners: torch and flax in process, MegEngine through one worker."""
from __future__ import annotations

import warnings

import pytest

from .harness import make_runners, strict


@pytest.fixture(scope="session")
def runners():
    runners, unavailable = make_runners()
    if unavailable:
        reasons = "; ".join(f"{k}: {v}" for k, v in unavailable.items())
        if strict():
            pytest.fail(f"backends unavailable under CI (a missing backend is a failure): {reasons}")
        warnings.warn(f"parity matrix runs without: {reasons}")
    return runners
