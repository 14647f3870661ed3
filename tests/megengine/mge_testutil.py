"""Shared helpers for the MegEngine backend tests (imported by the test files in this folder)."""
from __future__ import annotations

import numpy as np

# Tolerances (parity_tests.tolerance does not exist yet): float32 MegEngine vs the float64 oracle.
BLOCK_RTOL = 1e-5   # max|diff| <= BLOCK_RTOL * max|oracle| for single blocks
MODEL_RTOL = 1e-4   # the same, for whole models
STATE_RTOL = 1e-6   # deploy export_state vs reparameterize_state


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def rand_input(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_block_params(schema, seed: int = 0) -> dict[str, np.ndarray]:
    """Random block weights with non-trivial BN statistics, from a block schema."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, info in schema.items():
        shape = info.shape
        if info.kind in ("conv.weight", "linear.weight"):
            a = rng.normal(0.0, np.sqrt(1.0 / np.prod(shape[1:])), shape)
        elif info.kind == "bn.weight":
            a = rng.uniform(0.4, 1.2, shape)
        elif info.kind == "bn.running_var":
            a = rng.uniform(0.5, 2.0, shape)
        elif info.kind == "bn.running_mean":
            a = rng.normal(0.0, 0.2, shape)
        else:
            a = rng.normal(0.0, 0.1, shape)
        out[k] = a.astype(np.float32)
    return out
