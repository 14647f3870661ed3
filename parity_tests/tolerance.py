"""The tolerance policy, in one place.

Every output is compared with the float64 oracle as  max|y - y_oracle| / max|y_oracle|.

- Blocks: 1e-5 (float32 carries 24 bits, ~6e-8 per rounding; a block adds a few dozen roundings
  per output through its reductions).
- Whole models: rounding error compounds with depth. Measured with `reparam verify` (float32
  weights, random non-trivial BN statistics, 1x3x64x64): the worst relative error per model grows
  roughly linearly in the number of conv layers L on the forward path, staying below ~1.5e-7 * L
  for every backend and form on this machine. The bound allows a margin over that:
      tol(model) = 1e-5 + 1e-6 * L      (A0, L = 22: 3.2e-5;  D2se, L = 48: 5.8e-5)
  The parity matrix (test_parity.py) applies it to every registry model in every backend and
  form; `reparam verify` prints the margin (2026-12-02: worst model cell 1.5e-6, bounds
  2e-5..8e-5), so a regression that loosens precision fails there, not a widened bound.
"""

from __future__ import annotations

import numpy as np

from reparam_core.blocks.counting import conv_depth
from reparam_core.families.specs import ModelSpec

BLOCK_REL = 1e-5
MODEL_BASE_REL = 1e-5
MODEL_PER_LAYER_REL = 1e-6
# A fused deploy state against reparam_core.reparameterize_state (both float32 roundings of
# the same float64 values).
FUSED_STATE_REL = 1e-6


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    """max|y - ref| / max|ref| (inf when the shapes differ): the metric of every comparison."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if y.shape != ref.shape:
        return float("inf")
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def depth(spec: ModelSpec) -> int:
    """Conv layers on the longest forward path (the stem counts, the head does not)."""
    return conv_depth(spec)


def model_tolerance(spec: ModelSpec) -> float:
    return MODEL_BASE_REL + MODEL_PER_LAYER_REL * depth(spec)
