"""Blocks from their official constructors (reparam_core.official_block; cases in
parity_tests/cases.py OFFICIAL_BLOCKS) in every backend (torch, flax, MegEngine through its
worker): train and deploy form against the float64 oracle, the neutral state round trip, the
deploy state against reparam_core.reparameterize_state; one deploy artifact per family in
torch (ONNX) and Flax (StableHLO). MegEngine's native checks (and its traced .mge) are in
tests/megengine/test_mge_official.py."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from backend_adapters import BACKENDS, Target, check_outcome
from parity_tests.cases import official_cases
from parity_tests.harness import Case
from parity_tests.tolerance import BLOCK_REL, rel_err
from reparam_core import random_state, reparameterize_state
from reparam_core.oracle import block_forward

CASES = official_cases()


@lru_cache(maxsize=1)
def _data(case: Case) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    params = random_state(case.spec, "train", seed=3)
    x = case.input()
    return params, x, block_forward(case.spec, params, x, "train"), reparameterize_state(case.spec, params)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_official_block_matches_oracle(backend, case: Case) -> None:
    params, x, expected, fused = _data(case)
    out = backend.run(Target(case.spec), params, x, fused)
    check_outcome(out, case.spec, params, fused, expected, BLOCK_REL)
    print(f"\n{backend.name} {case.name}: rel err train {rel_err(out.y_train, expected):.2e} "
          f"deploy {rel_err(out.y_deploy, expected):.2e}")


# one block per family with a deploy artifact: the family's most composite branch structure
ARTIFACT = ("official-qarepvgg-v2", "official-yolov6-qarep-v2-keep-bn-g2", "official-dbb-k5-s2-g2",
            "official-acb-last-bn")


@pytest.mark.parametrize("name", ARTIFACT)
def test_deploy_artifacts_torch_onnx_and_flax_stablehlo(name: str, tmp_path) -> None:
    import onnxruntime as ort

    from backends import flax as bflax
    from backends import torch as btorch

    case = next(c for c in CASES if c.name == name)
    params, x, expected, _ = _data(case)
    tblock = btorch.reparameterize(btorch.load_state(btorch.build_block(case.spec), params))
    path = btorch.export_onnx(tblock, tmp_path / f"{name}.onnx", input_shape=x.shape)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y_onnx = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert rel_err(y_onnx, expected) <= BLOCK_REL
    fblock = bflax.reparameterize(bflax.load_state(bflax.build_block(case.spec), params))
    hlo = bflax.export_stablehlo(fblock, tmp_path / f"{name}.stablehlo", input_shape=x.shape)
    assert rel_err(np.asarray(bflax.load_stablehlo(hlo)(x)), expected) <= BLOCK_REL
