"""Helpers shared by the flax backend tests: tolerances, random block states, fast model builds."""

from __future__ import annotations

import numpy as np

import backends.flax as bf

# The tolerance policy lives in parity_tests/tolerance.py.
from parity_tests.tolerance import BLOCK_REL as BLOCK_RTOL  # noqa: F401
from parity_tests.tolerance import FUSED_STATE_REL as FUSE_RTOL  # noqa: F401
from parity_tests.tolerance import model_tolerance, rel_err  # noqa: F401
from reparam_core import get_spec, random_state
from reparam_core import random_tensors as random_params  # noqa: F401


def loaded_model(
    name: str, state: dict[str, np.ndarray], deploy: bool = False, num_classes: int = 1000
) -> bf.RepModule:
    """empty_model (abstract: no slow random init) filled by load_state."""
    return bf.load_state(bf.empty_model(name, num_classes=num_classes, deploy=deploy), state)


def model_input(name: str, batch: int = 1, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def model_state(name: str, seed: int = 0, num_classes: int = 1000) -> dict[str, np.ndarray]:
    return random_state(get_spec(name, num_classes), "train", seed)
