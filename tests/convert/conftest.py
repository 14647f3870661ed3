"""Fixtures shared by the convert tests (framework-free unless a test imports a framework)."""

from __future__ import annotations

import pytest

from reparam_core import get_spec, random_state


@pytest.fixture(scope="session")
def mini_spec():
    return get_spec("RepVGG-mini")


@pytest.fixture()
def mini_train(mini_spec):
    return random_state(mini_spec, "train", seed=1)


@pytest.fixture()
def mini_deploy(mini_spec):
    return random_state(mini_spec, "deploy", seed=2)
