"""Block matrix against the float64 oracle in train and deploy form: groups 1/2/4/depthwise,
stride 1/2 on odd AND even sizes (Flax 'SAME' pads stride-2 convs (0, 1) where torch pads
(1, 1): the backend must use explicit symmetric padding), in != out, dilation 2, conv bias,
SE pre/post, activations, RepConv naming, RepGhost modules and bottlenecks."""
from __future__ import annotations

import numpy as np
import pytest

import backends.flax as bf
from backends.flax.blocks import fused_neutral_state
from backends.flax.state import module_schema
from flax_testutil import BLOCK_RTOL, FUSE_RTOL, random_params, rel_err
from reparam_core import (CheckpointError, RepBlockSpec, RepGhostBottleneckSpec, RepGhostModuleSpec,
                          ReparamError, ShapeMismatchError, oracle)
from reparam_core.schema import bottleneck_schema, ghost_module_schema, repblock_schema

R = RepBlockSpec
REPBLOCKS = [
    ("identity", R(8, 8), (7, 9)),
    ("in!=out_s2_odd", R(8, 16, stride=2), (7, 9)),
    ("in!=out_s2_even", R(8, 16, stride=2), (8, 8)),
    ("s2_even_wide", R(8, 8, stride=2), (16, 16)),
    ("g2", R(8, 8, groups=2), (15, 15)),
    ("g4_s2_even", R(8, 16, stride=2, groups=4), (8, 10)),
    ("g4_s2_odd", R(8, 8, stride=2, groups=4), (15, 15)),
    ("depthwise", R(8, 8, groups=8), (7, 9)),
    ("depthwise_s2_even", R(8, 8, stride=2, groups=8), (16, 16)),
    ("depthwise_s2_odd", R(8, 8, stride=2, groups=8), (15, 15)),
    ("dilation2", R(8, 8, dilation=2), (15, 15)),
    ("dilation2_s2_g2", R(8, 16, stride=2, dilation=2, groups=2), (14, 14)),
    ("k5", R(8, 8, kernel_size=5), (9, 7)),
    ("conv_bias", R(8, 8, conv_bias=True), (7, 9)),
    ("conv_bias_s2", R(8, 16, stride=2, conv_bias=True), (8, 8)),
    ("se_pre", R(8, 8, se="pre", se_channels=2), (7, 9)),
    ("se_post", R(8, 8, se="post", se_channels=2), (7, 9)),
    ("se_post_s2", R(8, 16, stride=2, se="post", se_channels=4), (8, 8)),
    ("silu", R(8, 8, act="silu"), (7, 9)),
    ("identity_act", R(8, 16, act="identity"), (7, 9)),
    ("no_identity", R(8, 8, use_identity=False), (7, 9)),
    ("repconv", bf.repconv_spec(8, 8), (7, 9)),
    ("repconv_s2_g2_even", bf.repconv_spec(8, 16, stride=2, groups=2), (8, 8)),
]
GHOST_MODULES = [
    ("relu", RepGhostModuleSpec(8, 16), (7, 9)),
    ("no_relu", RepGhostModuleSpec(8, 12, relu=False), (8, 8)),
    ("no_reparam_bn", RepGhostModuleSpec(8, 8, reparam_bn=False), (7, 9)),
    ("dw5", RepGhostModuleSpec(8, 8, dw_size=5), (9, 9)),
    ("k3_s2_even", RepGhostModuleSpec(8, 16, kernel_size=3, stride=2), (8, 8)),
    ("k3_s2_odd", RepGhostModuleSpec(8, 16, kernel_size=3, stride=2), (15, 15)),
]
BOTTLENECKS = [
    ("identity_shortcut", RepGhostBottleneckSpec(8, 16, 8), (7, 9)),
    ("identity_se", RepGhostBottleneckSpec(16, 32, 16, se_channels=8), (7, 9)),
    ("conv_shortcut_s1", RepGhostBottleneckSpec(8, 16, 12), (7, 9)),
    ("s2_even_se", RepGhostBottleneckSpec(8, 24, 16, 3, 2, se_channels=8), (8, 8)),
    ("s2_odd_k5", RepGhostBottleneckSpec(8, 24, 16, 5, 2), (15, 15)),
    ("s2_even_k5_se", RepGhostBottleneckSpec(8, 24, 8, 5, 2, se_channels=4), (16, 16)),
]


def _schema(spec, form):
    if isinstance(spec, RepBlockSpec):
        return repblock_schema(spec, "", form)
    if isinstance(spec, RepGhostModuleSpec):
        return ghost_module_schema(spec, "", form)
    return bottleneck_schema(spec, "", form)


def _oracle(spec, x, params, form):
    if isinstance(spec, RepBlockSpec):
        return oracle.repblock(x, spec, params, "", form)
    if isinstance(spec, RepGhostModuleSpec):
        return oracle.ghost_module(x, spec, params, "", form)
    return oracle.ghost_bottleneck(x, spec, params, "", form)


CASES = ([pytest.param(s, hw, id=f"repblock-{n}") for n, s, hw in REPBLOCKS]
         + [pytest.param(s, hw, id=f"ghost_module-{n}") for n, s, hw in GHOST_MODULES]
         + [pytest.param(s, hw, id=f"bottleneck-{n}") for n, s, hw in BOTTLENECKS])
EXPECTED_CLASS = {"repvgg": bf.RepVGGBlock, "repconv": bf.RepConv}


@pytest.mark.parametrize("spec,hw", CASES)
def test_block_train_and_deploy_match_oracle(spec, hw) -> None:
    params = random_params(_schema(spec, "train"), seed=1)
    cin = spec.in_channels
    x = np.random.default_rng(2).standard_normal((2, cin, *hw)).astype(np.float32)
    block = bf.load_state(bf.empty_block(spec), params)
    if isinstance(spec, RepBlockSpec):
        cls = bf.RepVGGplusBlock if spec.se == "post" else EXPECTED_CLASS[spec.naming]
        assert type(block) is cls
    assert list(module_schema(block)) == list(_schema(spec, "train"))

    expected = _oracle(spec, x, params, "train")
    y = bf.predict(block, x)
    assert y.shape == expected.shape  # NCHW out, torch's output size (explicit padding)
    assert rel_err(y, expected) <= BLOCK_RTOL

    deploy = bf.reparameterize(block)
    assert deploy.deploy and not block.deploy and type(deploy) is type(block)
    assert deploy.reparameterize() is deploy
    fused = bf.export_state(deploy)
    assert list(fused) == list(_schema(spec, "deploy"))
    ref_fused = fused_neutral_state(spec, params, list(_schema(spec, "deploy")))
    for k, v in ref_fused.items():
        assert np.abs(fused[k] - v).max() <= FUSE_RTOL * max(np.abs(v).max(), 1e-12), k
    assert rel_err(bf.predict(deploy, x), expected) <= BLOCK_RTOL
    # the oracle's deploy form on the fused state agrees too
    assert rel_err(bf.predict(deploy, x), _oracle(spec, x, fused, "deploy")) <= BLOCK_RTOL
    # round trip of the neutral state is bit-exact
    for k, v in bf.export_state(block).items():
        np.testing.assert_array_equal(v, params[k], err_msg=k)


def test_build_block_picks_the_class_and_form() -> None:
    assert type(bf.build_block(R(4, 4))) is bf.RepVGGBlock
    assert type(bf.build_block(R(4, 4, se="post", se_channels=1))) is bf.RepVGGplusBlock
    assert type(bf.build_block(bf.repconv_spec(4, 4))) is bf.RepConv
    assert type(bf.build_block(RepGhostModuleSpec(4, 4))) is bf.RepGhostModule
    b = bf.build_block(RepGhostBottleneckSpec(4, 8, 4), deploy=True)
    assert type(b) is bf.RepGhostBottleneck and b.deploy and b.ghost1.deploy
    with pytest.raises(ReparamError):
        bf.RepVGGBlock(R(4, 4, se="post", se_channels=1))
    with pytest.raises(ReparamError):
        bf.RepConv(R(4, 4))


def test_load_state_errors_name_the_key() -> None:
    spec = R(4, 8, stride=2)
    block = bf.empty_block(spec)
    params = random_params(_schema(spec, "train"), 0)
    bad = dict(params)
    del bad["rbr_1x1.bn.weight"]
    with pytest.raises(CheckpointError, match="rbr_1x1.bn.weight"):
        bf.load_state(block, bad)
    bad = dict(params, **{"rbr_dense.conv.weight": np.zeros((8, 4, 1, 1), np.float32)})
    with pytest.raises(ShapeMismatchError, match="rbr_dense.conv.weight"):
        bf.load_state(block, bad)
    ok = dict(params, **{"rbr_dense.bn.num_batches_tracked": np.zeros((), np.float32)})
    bf.load_state(block, ok)  # ignored
    with pytest.raises(ReparamError):
        bf.predict(object(), np.zeros((1, 4, 4, 4), np.float32))  # type: ignore[arg-type]
