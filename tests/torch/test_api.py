"""The module-level API: reparameterize semantics, load_state validation, predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_testutil import random_params

import backends.torch as bt
from reparam_core import CheckpointError, RepBlockSpec, ShapeMismatchError, UnknownModelError, get_spec, random_state
from reparam_core.blocks.schema import block_schema


def _mini() -> bt.RepModule:
    return bt.load_state(
        bt.create_model("RepVGG-mini", num_classes=10), random_state(get_spec("RepVGG-mini", 10), "train", 1)
    )


def test_reparameterize_leaves_the_input_untouched() -> None:
    model = _mini()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy = bt.reparameterize(model)
    assert deploy is not model and deploy.deploy and not model.deploy
    assert isinstance(deploy, bt.RepVGG) and isinstance(deploy.stage2[1], bt.RepVGGBlock)
    with torch.no_grad():
        for p in deploy.parameters():
            p.add_(1.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert bt.reparameterize(deploy) is deploy and deploy.reparameterize() is deploy


def test_reparameterize_modes() -> None:
    model = _mini().eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = bt.predict(model, x)
    deploy = bt.reparameterize(model)
    assert not deploy.training
    np.testing.assert_allclose(bt.predict(deploy, x), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    block = bt.build_block(RepBlockSpec(4, 4)).train()
    assert bt.reparameterize(block).training


def test_predict_restores_mode_and_uses_running_stats() -> None:
    model = _mini().train()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y1, y2 = bt.predict(model, x), bt.predict(model, x)
    assert model.training and isinstance(y1, np.ndarray) and y1.dtype == np.float32
    np.testing.assert_array_equal(y1, y2)
    assert int(model.state_dict()["stage0.rbr_dense.bn.num_batches_tracked"]) == 0


def test_load_state_validates_models() -> None:
    model = bt.create_model("RepVGG-mini", num_classes=10)
    state = random_state(get_spec("RepVGG-mini", 10), "train", 0)
    missing = {k: v for k, v in state.items() if k != "stage1.0.rbr_1x1.bn.bias"}
    with pytest.raises(CheckpointError, match="stage1.0.rbr_1x1.bn.bias"):
        bt.load_state(model, missing)
    wrong = dict(state, **{"linear.weight": np.zeros((10, 7), np.float32)})
    with pytest.raises(ShapeMismatchError, match="linear.weight"):
        bt.load_state(model, wrong)
    with pytest.raises(CheckpointError, match="train-form"):
        bt.load_state(bt.create_model("RepVGG-mini", num_classes=10, deploy=True), state)
    with_counter = dict(state, **{"stage0.rbr_dense.bn.num_batches_tracked": np.array(5)})
    bt.load_state(model, with_counter)  # ignored
    np.testing.assert_array_equal(bt.export_state(model)["linear.bias"], state["linear.bias"])


def test_load_state_validates_blocks() -> None:
    spec = RepBlockSpec(8, 8, groups=2)
    block = bt.build_block(spec)
    params = random_params(block_schema(spec, "train"), 0)
    bt.load_state(block, params)
    with pytest.raises(CheckpointError, match="rbr_identity.weight"):
        bt.load_state(block, {k: v for k, v in params.items() if k != "rbr_identity.weight"})
    bad = dict(params, **{"rbr_dense.conv.weight": np.zeros((8, 8, 3, 3), np.float32)})
    with pytest.raises(ShapeMismatchError, match="rbr_dense.conv.weight"):
        bt.load_state(block, bad)


def test_create_model_errors_and_num_classes() -> None:
    with pytest.raises(UnknownModelError, match="RepVGG-A0"):
        bt.create_model("RepVGG-A00")
    with torch.device("meta"):
        model = bt.create_model("RepVGG-B0", num_classes=7)
    assert model.linear.weight.shape == (7, 1280)
