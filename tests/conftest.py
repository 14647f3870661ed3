"""Memory of the pytest processes (issue 28: one process over every .venv suite peaked at 10.6 GB
resident): after each test module, `release_memory` drops what the frameworks keep for the
whole process (JAX's compiled programs and traces, the Flax backend's abstract-build cache,
torch.compile's graphs, MegEngine's allocator cache, matplotlib's open figures), collects garbage
and calls glibc's malloc_trim, which hands the freed heap back to the system (without it RSS
never falls). A module marked `release_memory_per_test` (tests that each build full-size models)
gets the same after each of its tests, so that its peak is one model's.

This lives in tests/, not in the root conftest.py: Hypothesis draws constants from every loaded
local module outside test directories, so code here leaves the examples of the property tests as
they were. parity_tests/ has its own copy of the module-scoped release (parity_tests/conftest.py)."""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator

import pytest


def release_memory() -> None:
    """Drop the process-wide caches of whichever frameworks are loaded (none is imported here),
    collect garbage and return the freed heap to the system."""
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()  # every jit's compiled executables and traces
    flax_blocks = sys.modules.get("backends.flax.blocks")
    if flax_blocks is not None:
        flax_blocks._abstract.cache_clear()  # abstract builds (graphdef + shapes) per spec
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()  # torch.compile's compiled graphs and guards
    megengine = sys.modules.get("megengine")
    if megengine is not None:
        megengine.coalesce_free_memory()  # its allocator's cached free blocks
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "release_memory_per_test: release memory after each test of the module, not only after the "
        "module (tests that each build full-size models)",
    )


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_module() -> Iterator[None]:
    yield
    release_memory()


@pytest.fixture(autouse=True)
def _release_memory_after_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if request.node.get_closest_marker("release_memory_per_test") is not None:
        release_memory()
