"""Blocks from their official constructors (parity_tests/cases.py OFFICIAL_BLOCKS), natively in
MegEngine: native names == the official keys, train and deploy form against the float64 oracle,
the deploy state against reparam_core.reparameterize_state; a traced .mge of one block per
family; the QARepVGG-A0 model."""

from __future__ import annotations

import numpy as np
import pytest
from mge_testutil import BLOCK_RTOL, model_tolerance, rand_input, rel_err

from backends.megengine import (
    build_block,
    create_model,
    export_state,
    export_traced,
    load_state,
    predict,
    reparameterize,
    run_traced,
)
from parity_tests.cases import official_cases
from reparam_core import block_schema, get_spec, random_state, reparameterize_state, schema_for
from reparam_core.blocks import oracle

CASES = official_cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_official_block_native(case) -> None:
    spec = case.spec
    block = build_block(spec)
    assert set(block.state_dict()) == set(block_schema(spec, "train"))
    params = random_state(spec, "train", seed=4)
    load_state(block, params)
    back = export_state(block)
    assert all(np.array_equal(back[k], params[k]) for k in params)
    x = rand_input(case.shape, 5)
    ref = oracle.block_forward(spec, params, x, "train")
    assert rel_err(predict(block, x), ref) <= BLOCK_RTOL
    deployed = reparameterize(block)
    dstate = export_state(deployed)
    assert set(dstate) == set(block_schema(spec, "deploy"))
    for k, v in reparameterize_state(spec, params).items():
        assert np.allclose(dstate[k], v, rtol=1e-6, atol=1e-6), k
    assert rel_err(predict(deployed, x), ref) <= BLOCK_RTOL


ARTIFACT = (
    "official-qarepvgg-v2",
    "official-yolov6-qarep-v2-keep-bn-g2",
    "official-dbb-k5-s2-g2",
    "official-acb-last-bn",
)


@pytest.mark.parametrize("name", ARTIFACT)
def test_traced_artifact(name: str, tmp_path) -> None:
    case = next(c for c in CASES if c.name == name)
    params = random_state(case.spec, "train", seed=4)
    x = rand_input(case.shape, 6)
    ref = oracle.block_forward(case.spec, params, x, "train")
    block = load_state(build_block(case.spec), params)
    path = export_traced(block, tmp_path / f"{name}.mge", input_shape=x.shape)
    assert rel_err(run_traced(path, x), ref) <= BLOCK_RTOL


def test_qarepvgg_a0_native() -> None:
    spec = get_spec("QARepVGG-A0", 10)
    model = create_model("QARepVGG-A0", num_classes=10)
    assert set(model.state_dict()) == set(schema_for(spec, "train"))
    state = random_state(spec, "train", seed=0)
    load_state(model, state)
    x = rand_input((1, 3, 32, 32), 2)
    ref = oracle.forward(spec, state, x, "train")
    # measured 7.0e-7 (train form) and 4.6e-7 (deploy form); model_tolerance: 3.2e-5 (22 convs)
    tol = model_tolerance(spec)
    assert rel_err(predict(model, x), ref) <= tol
    assert rel_err(predict(reparameterize(model), x), ref) <= tol
