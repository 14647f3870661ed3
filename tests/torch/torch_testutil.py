"""Helpers shared by the torch backend tests: tolerances, random block states, fast model builds."""

from __future__ import annotations

import numpy as np

import backends.torch as bt

# The tolerance policy lives in parity_tests/tolerance.py.
from parity_tests.tolerance import BLOCK_REL as BLOCK_RTOL  # noqa: F401
from parity_tests.tolerance import FUSED_STATE_REL as FUSE_RTOL  # noqa: F401
from parity_tests.tolerance import model_tolerance, rel_err  # noqa: F401
from reparam_core import get_spec, random_state
from reparam_core import random_tensors as random_params  # noqa: F401


def loaded_model(
    name: str, state: dict[str, np.ndarray], deploy: bool = False, num_classes: int = 1000
) -> bt.RepModule:
    """empty_model (no slow initialisation), loaded."""
    return bt.load_state(bt.empty_model(name, num_classes=num_classes, deploy=deploy), state)


def model_state(name: str, seed: int = 0, num_classes: int = 1000) -> dict[str, np.ndarray]:
    return random_state(get_spec(name, num_classes), "train", seed)
