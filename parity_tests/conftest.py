"""Session-wide runners: torch and flax in process, MegEngine through one worker.

`runners` holds the backends that started; `missing_backends` the reason for each that did not.
What a missing backend means (a failure, or with `--allow-missing-backend` a skip) is decided in
test_parity.py; the option itself is registered in the repository-root conftest.py.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

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


def _release_memory() -> Callable[[], None]:
    """tests/conftest.py's release_memory (JAX's compiled programs, the frameworks' caches, gc,
    malloc_trim), loaded by path: both folders are named conftest on sys.path."""
    path = Path(__file__).resolve().parent.parent / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_reparam_tests_memory", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.release_memory


@pytest.fixture(autouse=True)
def _release_memory_after_model_case(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each registered model's case (up to RepVGGplus-L2pse, with its ONNX, StableHLO and
    MegEngine artifacts): what the case compiled and freed goes back, so that the process holds one
    model's memory at a time (issue 28: the matrix kept every model's, 7.5 GB)."""
    yield
    if getattr(request.node, "originalname", None) == "test_model":
        _RELEASE()


_RELEASE = _release_memory()
