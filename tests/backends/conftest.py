"""The `backend` fixture of the backend-parametrised suite: parametrise a test with
`@pytest.mark.parametrize("backend", BACKENDS, indirect=True)` and it receives that backend's
adapter (backend_adapters.py), started once per session. A backend that cannot start fails
the test; with `--allow-missing-backend` (ignored under CI=true) it is skipped instead."""

from __future__ import annotations

import pytest
from backend_adapters import Adapter, adapter, strict

from reparam_core import ReparamError


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Adapter:
    name = request.param
    try:
        return adapter(name)
    except (ImportError, ReparamError, OSError) as e:
        reason = f"backend {name} cannot start here: {type(e).__name__}: {e}"
        if request.config.getoption("--allow-missing-backend") and not strict():
            pytest.skip(reason)
        pytest.fail(reason)
