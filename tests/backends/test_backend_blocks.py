"""Every block of the block matrix, in every backend (torch, flax, MegEngine through its
worker), against the float64 oracle in train and deploy form; the deploy state against
reparam_core.reparameterize_state; the neutral state round trip; load_state errors naming the
key; the block classes refusing a spec of another kind.

Replaces the per-backend copies tests/torch/test_blocks.py, tests/flax/test_flax_blocks.py and
the matrix tests of tests/megengine/test_mge_blocks.py. Framework traps keep their own tests there.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from backend_adapters import BACKENDS, IN_PROCESS, Target, check_outcome
from block_matrix import BLOCK_MATRIX, BlockCase

from parity_tests.tolerance import BLOCK_REL, rel_err
from reparam_core import (
    CheckpointError,
    ReparamError,
    RepBlockSpec,
    RepGhostBottleneckSpec,
    RepGhostModuleSpec,
    ShapeMismatchError,
    random_state,
    reparameterize_state,
    repconv_spec,
)
from reparam_core.blocks.oracle import block_forward


@lru_cache(maxsize=1)
def _case_data(case: BlockCase) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    """Train state, input, float64 oracle output and the core's fused state: computed once per
    case and shared by the backends (the backend parameter varies fastest)."""
    params = random_state(case.spec, "train", seed=1)
    x = np.random.default_rng(2).standard_normal((2, case.spec.in_channels, *case.hw))
    x = x.astype(np.float32)
    return params, x, block_forward(case.spec, params, x, "train"), reparameterize_state(case.spec, params)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", BLOCK_MATRIX, ids=lambda c: c.id)
def test_block_train_and_deploy_match_oracle(backend, case: BlockCase) -> None:
    params, x, expected, fused = _case_data(case)
    out = backend.run(Target(case.spec), params, x, fused)
    check_outcome(out, case.spec, params, fused, expected, BLOCK_REL)
    # the oracle's deploy form on the backend's fused state agrees with both
    deploy_ref = block_forward(case.spec, out.deploy_state, x, "deploy")
    assert rel_err(deploy_ref, expected) <= BLOCK_REL
    assert rel_err(out.y_deploy, deploy_ref) <= BLOCK_REL


# ----------------------------------------------------------------------------- load_state errors

_S2 = RepBlockSpec(4, 8, stride=2)
_ID = RepBlockSpec(4, 4)


def _without(key: str):
    return lambda p: {k: v for k, v in p.items() if k != key}


def _with(key: str, value: np.ndarray):
    return lambda p: {**p, key: value}


LOAD_ERRORS = [  # (id, spec, edit of a valid train state, error, message)
    ("missing-1x1-bn", _S2, _without("rbr_1x1.bn.weight"), CheckpointError, "rbr_1x1.bn.weight"),
    (
        "dense-kernel-shape",
        _S2,
        _with("rbr_dense.conv.weight", np.zeros((8, 4, 1, 1), np.float32)),
        ShapeMismatchError,
        "rbr_dense.conv.weight",
    ),
    ("missing-identity", _ID, _without("rbr_identity.weight"), CheckpointError, "rbr_identity.weight"),
    (
        "1x1-kernel-shape",
        _ID,
        _with("rbr_1x1.conv.weight", np.zeros((4, 4, 3, 3), np.float32)),
        ShapeMismatchError,
        "rbr_1x1.conv.weight",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("spec,edit,error,match", [pytest.param(*c[1:], id=c[0]) for c in LOAD_ERRORS])
def test_load_state_errors_name_the_key(backend, spec, edit, error, match) -> None:
    params = random_state(spec, "train", seed=0)
    x = np.zeros((1, spec.in_channels, 6, 6), np.float32)
    with pytest.raises(error, match=match):
        backend.load_and_predict(Target(spec), edit(params), x)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_load_state_ignores_num_batches_tracked(backend) -> None:
    params = random_state(_S2, "train", seed=0)
    x = np.random.default_rng(3).standard_normal((1, 4, 6, 6)).astype(np.float32)
    extra = {**params, "rbr_dense.bn.num_batches_tracked": np.zeros((), np.float32)}
    y = backend.load_and_predict(Target(_S2), extra, x)
    assert rel_err(y, block_forward(_S2, params, x, "train")) <= BLOCK_REL


# ----------------------------------------------------------------------------- classes (in-process)


# What the refusal says, where the backend's own tests pinned it (elsewhere: the class only).
CLASS_ERROR_MESSAGES = {"torch": ("naming='repconv'", "se='post'", "build_block")}


@pytest.mark.parametrize("backend", IN_PROCESS, indirect=True)
def test_block_classes_check_their_spec(backend) -> None:
    api = backend.api
    repconv, plus, plain = CLASS_ERROR_MESSAGES.get(backend.name, (None, None, None))
    with pytest.raises(ReparamError, match=repconv):
        api.RepConv(RepBlockSpec(8, 8))
    with pytest.raises(ReparamError, match=plus):
        api.RepVGGplusBlock(RepBlockSpec(8, 8))
    with pytest.raises(ReparamError, match=plain):
        api.RepVGGBlock(RepBlockSpec(8, 8, se="post", se_channels=2))
    assert type(api.build_block(RepBlockSpec(4, 4))) is api.RepVGGBlock
    assert type(api.build_block(RepBlockSpec(4, 4, se="post", se_channels=1))) is api.RepVGGplusBlock
    assert type(api.build_block(repconv_spec(4, 4))) is api.RepConv
    assert type(api.build_block(RepGhostModuleSpec(4, 4))) is api.RepGhostModule
    b = api.build_block(RepGhostBottleneckSpec(4, 8, 4), deploy=True)
    assert type(b) is api.RepGhostBottleneck and b.deploy and b.ghost1.deploy
    assert isinstance(b.ghost1, api.RepGhostModule)


@pytest.mark.parametrize("backend", IN_PROCESS, indirect=True)
def test_predict_refuses_a_foreign_object(backend) -> None:
    with pytest.raises(ReparamError):
        backend.api.predict(object(), np.zeros((1, 4, 4, 4), np.float32))
