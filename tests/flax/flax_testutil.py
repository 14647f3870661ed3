"""Helpers shared by the flax backend tests: tolerances, random block states, fast model builds."""
from __future__ import annotations

import math

import numpy as np

import backends.flax as bf
from reparam_core import get_spec, random_state
from reparam_core.schema import Schema

try:  # the documented bound of the parity issue, when present
    from parity_tests.tolerance import BLOCK_REL, model_tolerance
except ImportError:  # pragma: no cover - fallback constants (same policy as tests/torch)
    BLOCK_REL = 1e-5

    def model_tolerance(spec) -> float:
        return 1e-4

# Blocks: max|diff| <= 1e-5 * max|oracle| (float32 conv against the float64 oracle).
BLOCK_RTOL = BLOCK_REL
# Deploy-form export_state against reparam_core.reparameterize_state.
FUSE_RTOL = 1e-6


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max|actual - expected| / max|expected|."""
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def random_params(schema: Schema, seed: int) -> dict[str, np.ndarray]:
    """Random float32 tensors for a block schema with non-trivial BN statistics."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, info in schema.items():
        if info.kind.endswith(".weight") and info.kind != "bn.weight":
            a = rng.normal(0.0, math.sqrt(1.0 / math.prod(info.shape[1:])), info.shape)
        elif info.kind == "bn.weight":
            a = rng.uniform(0.4, 1.2, info.shape)
        elif info.kind == "bn.running_var":
            a = rng.uniform(0.5, 2.0, info.shape)
        elif info.kind == "bn.running_mean":
            a = rng.normal(0.0, 0.2, info.shape)
        else:
            a = rng.normal(0.0, 0.1, info.shape)
        out[key] = a.astype(np.float32)
    return out


def loaded_model(name: str, state: dict[str, np.ndarray], deploy: bool = False,
                 num_classes: int = 1000) -> bf.RepModule:
    """empty_model (abstract: no slow random init) filled by load_state."""
    return bf.load_state(bf.empty_model(name, num_classes=num_classes, deploy=deploy), state)


def model_input(name: str, batch: int = 1, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def model_state(name: str, seed: int = 0, num_classes: int = 1000) -> dict[str, np.ndarray]:
    return random_state(get_spec(name, num_classes), "train", seed)
