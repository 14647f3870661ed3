"""Fixtures for tests/families."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread_for_references(request: pytest.FixtureRequest) -> Iterator[None]:
    """The independent references (test_reference_*.py) run many tiny float64 convs, where
    torch's intra-op threads only contend with each other (and with the other processes on a
    loaded machine): one thread while such a module runs, the previous count restored after it
    (later suites in the same process get theirs back). Other modules are left as they are, and
    torch is imported only for the references (test_official_blocks.py and test_qarepvgg.py are
    numpy only)."""
    if not request.module.__name__.rsplit(".", 1)[-1].startswith("test_reference_"):
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
