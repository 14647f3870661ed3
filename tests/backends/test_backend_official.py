"""Blocks from their official constructors (reparam_core.official_block; cases in
parity_tests/cases.py OFFICIAL_BLOCKS) in every backend (torch, flax, MegEngine through its
worker): train and deploy form against the float64 oracle, the neutral state round trip, the
deploy state against reparam_core.reparameterize_state.

Flax runs here with --slow only (its compile time is most of the cost): by default every
official class runs in Flax (and in torch and MegEngine, with deploy artifacts: ONNX, traced
.mge, StableHLO) in the parity matrix (parity_tests/cases.py PARITY_OFFICIAL). MegEngine's
native checks are in tests/megengine/test_mge_official.py."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from backend_adapters import BACKENDS, Target, check_outcome

from parity_tests.cases import official_cases
from parity_tests.harness import Case
from parity_tests.tolerance import BLOCK_REL, rel_err
from reparam_core import random_state, reparameterize_state
from reparam_core.blocks.oracle import block_forward

CASES = official_cases()
_BACKENDS = [pytest.param(b, marks=pytest.mark.slow) if b == "flax" else b for b in BACKENDS]


@lru_cache(maxsize=1)
def _data(case: Case) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    params = random_state(case.spec, "train", seed=3)
    x = case.input()
    return params, x, block_forward(case.spec, params, x, "train"), reparameterize_state(case.spec, params)


@pytest.mark.parametrize("backend", _BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_official_block_matches_oracle(backend, case: Case) -> None:
    params, x, expected, fused = _data(case)
    out = backend.run(Target(case.spec), params, x, fused)
    check_outcome(out, case.spec, params, fused, expected, BLOCK_REL)
    print(
        f"\n{backend.name} {case.name}: rel err train {rel_err(out.y_train, expected):.2e} "
        f"deploy {rel_err(out.y_deploy, expected):.2e}"
    )
