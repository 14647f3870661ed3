"""Shared helpers for the MegEngine backend tests (imported by the test files in this folder)."""

from __future__ import annotations

import numpy as np

# The tolerance policy lives in parity_tests/tolerance.py (numpy only: importable here).
from parity_tests.tolerance import BLOCK_REL as BLOCK_RTOL  # noqa: F401
from parity_tests.tolerance import model_tolerance, rel_err  # noqa: F401
from reparam_core import random_tensors as random_block_params  # noqa: F401


def rand_input(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)
