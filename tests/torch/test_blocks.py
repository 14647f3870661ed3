"""Block matrix: every block kind over groups / stride / in != out / dilation / odd sizes / conv
bias / SE against the float64 oracle, in train form and after reparameterize()."""
from __future__ import annotations

import numpy as np
import pytest

import backends.torch as bt
from reparam_core import (RepBlockSpec, RepGhostBottleneckSpec, RepGhostModuleSpec,
                          ghost_cheap_kernel_bias, oracle, repblock_kernel_bias)
from reparam_core.schema import bottleneck_schema, ghost_module_schema, repblock_schema
from torch_testutil import BLOCK_RTOL, FUSE_RTOL, random_params, rel_err

REPBLOCKS = {
    "same-15x15": (RepBlockSpec(8, 8), (15, 15)),
    "in!=out-s2-7x9": (RepBlockSpec(8, 16, stride=2), (7, 9)),
    "g2": (RepBlockSpec(8, 8, groups=2), (15, 15)),
    "g4-s2": (RepBlockSpec(8, 16, stride=2, groups=4), (7, 9)),
    "g4-in!=out-s1": (RepBlockSpec(8, 16, groups=4), (7, 9)),
    "depthwise": (RepBlockSpec(8, 8, groups=8), (15, 15)),
    "depthwise-s2": (RepBlockSpec(8, 8, stride=2, groups=8), (7, 9)),
    "dilation2": (RepBlockSpec(8, 8, dilation=2), (15, 15)),
    "dilation2-g4-7x9": (RepBlockSpec(8, 8, dilation=2, groups=4), (7, 9)),
    "dilation2-s2": (RepBlockSpec(8, 12, stride=2, dilation=2), (15, 15)),
    "k5": (RepBlockSpec(8, 8, kernel_size=5), (7, 9)),
    "conv-bias": (RepBlockSpec(8, 8, conv_bias=True), (7, 9)),
    "conv-bias-g2-s2": (RepBlockSpec(8, 16, stride=2, groups=2, conv_bias=True), (15, 15)),
    "se-pre": (RepBlockSpec(8, 8, se="pre", se_channels=2), (7, 9)),
    "se-pre-s2": (RepBlockSpec(8, 16, stride=2, se="pre", se_channels=4), (15, 15)),
    "se-post": (RepBlockSpec(8, 8, se="post", se_channels=2), (7, 9)),
    "se-post-g4-dil2": (RepBlockSpec(8, 8, groups=4, dilation=2, se="post", se_channels=2), (15, 15)),
    "silu": (RepBlockSpec(8, 8, act="silu"), (7, 9)),
    "no-act": (RepBlockSpec(8, 8, act="identity", eps=1e-3), (7, 9)),
    "repconv": (bt.repconv_spec(8, 8), (15, 15)),
    "repconv-s2-g2": (bt.repconv_spec(8, 16, stride=2, groups=2), (7, 9)),
    "repconv-relu-dw": (bt.repconv_spec(8, 8, groups=8, act="relu"), (7, 9)),
}

GHOST_MODULES = {
    "relu": (RepGhostModuleSpec(8, 12), (7, 9)),
    "linear": (RepGhostModuleSpec(8, 12, relu=False), (15, 15)),
    "dw5": (RepGhostModuleSpec(12, 8, dw_size=5), (7, 9)),
    "k3-s2": (RepGhostModuleSpec(8, 8, kernel_size=3, stride=2), (15, 15)),
    "no-reparam-bn": (RepGhostModuleSpec(8, 8, reparam_bn=False), (7, 9)),
}

BOTTLENECKS = {
    "identity-shortcut": (RepGhostBottleneckSpec(8, 16, 8), (15, 15)),
    "s2-se-k5": (RepGhostBottleneckSpec(8, 24, 12, dw_kernel_size=5, stride=2, se_channels=8), (15, 15)),
    "in!=out-s1": (RepGhostBottleneckSpec(8, 16, 12), (7, 9)),
    "se-s1": (RepGhostBottleneckSpec(12, 20, 12, se_channels=4), (7, 9)),
    "s2-k3": (RepGhostBottleneckSpec(8, 16, 8, stride=2), (7, 9)),
}


def _input(spec, hw: tuple[int, int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, spec.in_channels, *hw)).astype(np.float32)


def _check_keys(module: bt.RepModule, schema: dict) -> None:
    native = {k: tuple(v.shape) for k, v in module.state_dict().items()
              if not k.endswith("num_batches_tracked")}
    assert native == {k: info.shape for k, info in schema.items()}


def _run(spec, hw, schema_fn, oracle_fn, expected_class):
    params = random_params(schema_fn(spec, "", "train"), seed=3)
    block = bt.build_block(spec)
    assert type(block) is expected_class and not block.deploy
    _check_keys(block, schema_fn(spec, "", "train"))
    bt.load_state(block, params)
    x = _input(spec, hw)
    expected = oracle_fn(x, spec, params, "", "train")
    y = bt.predict(block, x)
    assert y.shape == expected.shape
    assert rel_err(y, expected) <= BLOCK_RTOL

    deploy = block.reparameterize()
    assert type(deploy) is expected_class and deploy.deploy and deploy is not block
    assert deploy.reparameterize() is deploy
    deploy_state = bt.export_state(deploy)
    _check_keys(deploy, schema_fn(spec, "", "deploy"))
    assert rel_err(bt.predict(deploy, x), expected) <= BLOCK_RTOL
    assert rel_err(oracle_fn(x, spec, deploy_state, "", "deploy"), expected) <= BLOCK_RTOL
    return params, deploy_state


def _assert_fused(got: dict, module: str, kernel: np.ndarray, bias: np.ndarray) -> None:
    for field, ref in (("weight", kernel), ("bias", bias)):
        diff = np.abs(got[f"{module}.{field}"] - ref).max()
        assert diff <= FUSE_RTOL * np.abs(ref).max(), (module, field)


@pytest.mark.parametrize("case", list(REPBLOCKS))
def test_repblock(case: str) -> None:
    spec, hw = REPBLOCKS[case]
    cls = bt.RepConv if spec.naming == "repconv" else (
        bt.RepVGGplusBlock if spec.se == "post" else bt.RepVGGBlock)
    params, deploy_state = _run(spec, hw, repblock_schema, oracle.repblock, cls)
    kernel, bias = repblock_kernel_bias(spec, params)
    _assert_fused(deploy_state, "rbr_reparam", kernel, bias)


@pytest.mark.parametrize("case", list(GHOST_MODULES))
def test_ghost_module(case: str) -> None:
    spec, hw = GHOST_MODULES[case]
    params, deploy_state = _run(spec, hw, ghost_module_schema, oracle.ghost_module,
                                bt.RepGhostModule)
    kernel, bias = ghost_cheap_kernel_bias(spec, params)
    _assert_fused(deploy_state, "cheap_operation", kernel, bias)
    for k in ("primary_conv.0.weight", "primary_conv.1.running_var"):
        np.testing.assert_array_equal(deploy_state[k], params[k])


@pytest.mark.parametrize("case", list(BOTTLENECKS))
def test_ghost_bottleneck(case: str) -> None:
    spec, hw = BOTTLENECKS[case]
    params, deploy_state = _run(spec, hw, bottleneck_schema, oracle.ghost_bottleneck,
                                bt.RepGhostBottleneck)
    for name, m in (("ghost1", spec.ghost1), ("ghost2", spec.ghost2)):
        sub = {k[len(name) + 1:]: v for k, v in params.items() if k.startswith(name + ".")}
        _assert_fused(deploy_state, f"{name}.cheap_operation", *ghost_cheap_kernel_bias(m, sub))


def test_block_classes_check_their_spec() -> None:
    from reparam_core import ReparamError
    with pytest.raises(ReparamError, match="naming='repconv'"):
        bt.RepConv(RepBlockSpec(8, 8))
    with pytest.raises(ReparamError, match="se='post'"):
        bt.RepVGGplusBlock(RepBlockSpec(8, 8))
    with pytest.raises(ReparamError, match="build_block"):
        bt.RepVGGBlock(RepBlockSpec(8, 8, se="post", se_channels=2))
    assert isinstance(bt.build_block(RepBlockSpec(8, 8, se="post", se_channels=2)),
                      bt.RepVGGplusBlock)


def test_repconv_uses_yolov7_names_silu_and_spec_eps() -> None:
    block = bt.build_block(bt.repconv_spec(8, 8))
    assert {"rbr_dense.0.weight", "rbr_dense.1.running_var", "rbr_1x1.0.weight",
            "rbr_identity.weight"} <= set(block.state_dict())
    assert isinstance(block.act, bt.blocks.nn.SiLU)
    assert block.rbr_dense[1].eps == 1e-3 and block.rbr_identity.eps == 1e-3
    assert set(block.reparameterize().state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"}
