"""The `backend` fixture of the backend-parametrised suite: parametrise a test with
`@pytest.mark.parametrize("backend", BACKENDS, indirect=True)` and it receives that backend's
adapter (backend_adapters.py), started once per session. A backend that cannot start fails
the test; with `--allow-missing-backend` (ignored under CI=true) it is skipped instead
(parity_tests/backend_rule.py)."""

from __future__ import annotations

import pytest
from backend_adapters import Adapter, adapter

from parity_tests.backend_rule import missing_backend
from reparam_core import ReparamError


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Adapter:
    name = request.param
    try:
        return adapter(name)
    except (ImportError, ReparamError, OSError) as e:
        missing_backend(request.config, f"backend {name} cannot start here: {type(e).__name__}: {e}")
