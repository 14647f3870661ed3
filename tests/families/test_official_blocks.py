"""official_block: every official class's state keys in train and deploy form against names
written out by hand from the official code (relative to the block), shapes of the asymmetric
and identity-based convs, the identity-based 1x1 semantics, and argument validation."""

from __future__ import annotations

import numpy as np
import pytest

from reparam_core import (
    BN,
    Block,
    Conv,
    PadBN,
    Rep,
    SpecError,
    block_schema,
    official_block,
    official_classes,
    random_state,
    reparameterize_state,
)
from reparam_core.blocks.oracle import block_forward

BN4 = ("weight", "bias", "running_mean", "running_var")


def bn(name: str) -> set[str]:
    return {f"{name}.{f}" for f in BN4}


def conv(name: str, bias: bool = False) -> set[str]:
    return {f"{name}.weight"} | ({f"{name}.bias"} if bias else set())


# (class, constructor arguments, train keys, deploy keys), from the official sources
KEYS = [
    (
        "RepVGGBlock",
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1),
        bn("rbr_identity") | conv("rbr_dense.conv") | bn("rbr_dense.bn") | conv("rbr_1x1.conv") | bn("rbr_1x1.bn"),
        conv("rbr_reparam", True),
    ),
    (
        "RepVGGBlock",
        dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=1, use_se=True),
        conv("rbr_dense.conv")
        | bn("rbr_dense.bn")
        | conv("rbr_1x1.conv")
        | bn("rbr_1x1.bn")
        | conv("se.down", True)
        | conv("se.up", True),
        conv("rbr_reparam", True) | conv("se.down", True) | conv("se.up", True),
    ),
    (
        "RepConv",
        dict(c1=8, c2=8),
        bn("rbr_identity") | conv("rbr_dense.0") | bn("rbr_dense.1") | conv("rbr_1x1.0") | bn("rbr_1x1.1"),
        conv("rbr_reparam", True),
    ),
    (
        "RepGhostModule",
        dict(inp=8, oup=12),
        conv("primary_conv.0")
        | bn("primary_conv.1")
        | bn("fusion_bn.0")
        | conv("cheap_operation.0")
        | bn("cheap_operation.1"),
        conv("primary_conv.0") | bn("primary_conv.1") | conv("cheap_operation", True),
    ),
    (
        "RepGhostModule",
        dict(inp=8, oup=8, reparam_bn=False, reparam_identity=True),
        conv("primary_conv.0") | bn("primary_conv.1") | conv("cheap_operation.0") | bn("cheap_operation.1"),
        conv("primary_conv.0") | bn("primary_conv.1") | conv("cheap_operation", True),
    ),
    (
        "QARepVGGBlockV2",
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1),
        conv("rbr_dense.conv") | bn("rbr_dense.bn") | conv("rbr_1x1") | bn("bn"),
        conv("rbr_reparam", True),
    ),
    (
        "yolov6.QARepVGGBlock",
        dict(in_channels=8, out_channels=16, stride=2),
        conv("rbr_dense.conv") | bn("rbr_dense.bn") | conv("rbr_1x1") | bn("bn"),
        conv("rbr_reparam", True),
    ),
    (
        "yolov6.QARepVGGBlock",
        dict(in_channels=8, out_channels=8, keep_post_bn=True),
        conv("rbr_dense.conv") | bn("rbr_dense.bn") | conv("rbr_1x1") | bn("bn"),
        conv("rbr_reparam", True) | bn("bn"),
    ),
    (
        "yolov6.QARepVGGBlockV2",
        dict(in_channels=8, out_channels=8),  # rbr_avg: no tensors
        conv("rbr_dense.conv") | bn("rbr_dense.bn") | conv("rbr_1x1") | bn("bn"),
        conv("rbr_reparam", True),
    ),
    (
        "DiverseBranchBlock",
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
        conv("dbb_origin.conv")
        | bn("dbb_origin.bn")
        | conv("dbb_avg.conv")
        | bn("dbb_avg.bn.bn")
        | bn("dbb_avg.avgbn")
        | conv("dbb_1x1.conv")
        | bn("dbb_1x1.bn")
        | conv("dbb_1x1_kxk.idconv1")
        | bn("dbb_1x1_kxk.bn1.bn")
        | conv("dbb_1x1_kxk.conv2")
        | bn("dbb_1x1_kxk.bn2"),
        conv("dbb_reparam", True),
    ),
    (
        "DiverseBranchBlock",
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
        conv("dbb_origin.conv")
        | bn("dbb_origin.bn")
        | bn("dbb_avg.avgbn")
        | conv("dbb_1x1_kxk.conv1")
        | bn("dbb_1x1_kxk.bn1.bn")
        | conv("dbb_1x1_kxk.conv2")
        | bn("dbb_1x1_kxk.bn2"),
        conv("dbb_reparam", True),
    ),
    (
        "ACBlock",
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1),
        conv("square_conv") | bn("square_bn") | conv("ver_conv") | bn("ver_bn") | conv("hor_conv") | bn("hor_bn"),
        conv("fused_conv", True),
    ),
    (
        "ACBlock",
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, use_last_bn=True),
        conv("square_conv")
        | bn("square_bn")
        | conv("ver_conv")
        | bn("ver_bn")
        | conv("hor_conv")
        | bn("hor_bn")
        | bn("last_bn"),
        conv("fused_conv", True),
    ),
    # apple/ml-fastvit models/fastvit.py, models/modules/{mobileone,replknet}.py
    (
        "RepMixer",
        dict(dim=8),
        bn("mixer.rbr_skip")
        | conv("mixer.rbr_conv.0.conv")
        | bn("mixer.rbr_conv.0.bn")
        | conv("mixer.rbr_scale.conv")
        | bn("mixer.rbr_scale.bn")
        | bn("norm.rbr_skip")
        | {"layer_scale"},
        conv("reparam_conv", True),
    ),
    (
        "ReparamLargeKernelConv",
        dict(in_channels=8, out_channels=16, kernel_size=7, stride=2, groups=8, small_kernel=3),
        conv("lkb_origin.conv") | bn("lkb_origin.bn") | conv("small_conv.conv") | bn("small_conv.bn"),
        conv("lkb_reparam", True),
    ),
    ("RepCPE", dict(in_channels=8, embed_dim=8), conv("pe", True), conv("reparam_conv", True)),
    (
        "fastvit.MobileOneBlock",
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8, use_act=False),
        bn("rbr_skip") | conv("rbr_conv.0.conv") | bn("rbr_conv.0.bn") | conv("rbr_scale.conv") | bn("rbr_scale.bn"),
        conv("reparam_conv", True),
    ),
    # THU-MIG/RepViT: RepVGGDW's fused conv replaces the module itself (keys without a prefix)
    (
        "RepVGGDW",
        dict(ed=8),
        conv("conv.c") | bn("conv.bn") | conv("conv1", True) | bn("bn"),
        {"weight", "bias"},
    ),
    (
        "RepViTBlock",
        dict(inp=16, hidden_dim=32, oup=16, kernel_size=3, stride=1, use_se=1, use_hs=1),
        conv("token_mixer.0.conv.c")
        | bn("token_mixer.0.conv.bn")
        | conv("token_mixer.0.conv1", True)
        | bn("token_mixer.0.bn")
        | conv("token_mixer.1.fc1", True)
        | conv("token_mixer.1.fc2", True)
        | conv("channel_mixer.m.0.c")
        | bn("channel_mixer.m.0.bn")
        | conv("channel_mixer.m.2.c")
        | bn("channel_mixer.m.2.bn"),
        conv("token_mixer.0", True)
        | conv("token_mixer.1.fc1", True)
        | conv("token_mixer.1.fc2", True)
        | conv("channel_mixer.m.0", True)
        | conv("channel_mixer.m.2", True),
    ),
    # AILab-CVC/UniRepLKNet: kernel 7 merges dilated (5, 1), (3, 2), (3, 3) into lk_origin
    (
        "DilatedReparamBlock",
        dict(channels=8, kernel_size=7, deploy=False),
        conv("lk_origin")
        | bn("origin_bn")
        | conv("dil_conv_k5_1")
        | bn("dil_bn_k5_1")
        | conv("dil_conv_k3_2")
        | bn("dil_bn_k3_2")
        | conv("dil_conv_k3_3")
        | bn("dil_bn_k3_3"),
        conv("lk_origin", True),
    ),
    (
        "UniRepLKNetBlock",
        dict(dim=8, kernel_size=3),
        conv("dwconv")
        | bn("norm")
        | conv("se.down", True)
        | conv("se.up", True)
        | conv("pwconv1.1", True)
        | {"act.1.gamma", "act.1.beta"}
        | conv("pwconv2.0")
        | bn("pwconv2.2")
        | {"gamma"},
        conv("dwconv", True)
        | conv("se.down", True)
        | conv("se.up", True)
        | conv("pwconv1.1", True)
        | {"act.1.gamma"}
        | conv("pwconv2.0", True),
    ),
]


@pytest.mark.parametrize("cls,kwargs,train,deploy", KEYS, ids=[f"{k[0]}-{i}" for i, k in enumerate(KEYS)])
def test_official_keys_in_both_forms(cls, kwargs, train, deploy) -> None:
    spec = official_block(cls, **kwargs)
    assert set(block_schema(spec, "train")) == train
    assert set(block_schema(spec, "deploy")) == deploy


def test_every_official_class_has_key_cases() -> None:
    assert {c for c, *_ in KEYS} == set(official_classes()) - {"MobileOneBlock"}


def test_shapes_of_the_asymmetric_and_grouped_convs() -> None:
    acb = block_schema(official_block("ACBlock", 8, 16, 5, padding=2, groups=4), "train")
    assert acb["ver_conv.weight"].shape == (16, 2, 5, 1)
    assert acb["hor_conv.weight"].shape == (16, 2, 1, 5)
    assert acb["square_conv.weight"].shape == (16, 2, 5, 5)
    dbb = block_schema(official_block("DiverseBranchBlock", 8, 16, 5, padding=2, groups=2), "train")
    assert dbb["dbb_1x1_kxk.idconv1.weight"].shape == (8, 4, 1, 1)
    assert dbb["dbb_1x1_kxk.conv2.weight"].shape == (16, 4, 5, 5)
    dw = block_schema(official_block("DiverseBranchBlock", 8, 8, 3, padding=1, groups=8), "train")
    assert dw["dbb_1x1_kxk.conv1.weight"].shape == (16, 1, 1, 1)  # 2x internal channels
    assert dw["dbb_1x1_kxk.bn1.bn.weight"].shape == (16,)
    assert official_block("RepVGGBlock", 32, 32, 3, padding=1, use_se=True).se_channels == 2


@pytest.mark.parametrize("groups", [1, 2])
def test_identity_based_1x1_is_stored_weight_plus_identity(groups: int) -> None:
    """The idconv1 branch with stored W equals a plain 1x1 conv holding W + I, where I is built
    here as the official code builds it: I[i, i mod (C/g)] = 1."""
    c = 4
    spec = official_block("DiverseBranchBlock", c, c, 3, padding=1, groups=groups)
    params = random_state(spec, "train", seed=5)
    ident = np.zeros((c, c // groups, 1, 1), np.float32)
    for i in range(c):
        ident[i, i % (c // groups), 0, 0] = 1.0
    tail = (
        PadBN("dbb_1x1_kxk.bn1.bn", c, 1),
        Conv("dbb_1x1_kxk.conv2", c, c, 3, groups=groups),
        BN("dbb_1x1_kxk.bn2", c),
    )
    plain = Block(
        "",
        "Plain",
        (
            Rep(
                ((Conv("dbb_1x1_kxk.idconv1", c, c, 1, groups=groups),) + tail,),
                Conv("f", c, c, 3, padding=1, groups=groups),
            ),
        ),
    )
    based = Block(
        "",
        "Based",
        (
            Rep(
                ((Conv("dbb_1x1_kxk.idconv1", c, c, 1, groups=groups, plus_identity=True),) + tail,),
                Conv("f", c, c, 3, padding=1, groups=groups),
            ),
        ),
    )
    stored = params["dbb_1x1_kxk.idconv1.weight"].astype(np.float64)
    shifted = {**params, "dbb_1x1_kxk.idconv1.weight": stored + ident}
    x = np.random.default_rng(0).standard_normal((1, c, 6, 7))
    ref = block_forward(plain, shifted, x, "train")
    np.testing.assert_allclose(block_forward(based, params, x, "train"), ref, rtol=1e-12, atol=1e-12)
    f_based, f_plain = reparameterize_state(based, params), reparameterize_state(plain, shifted)
    np.testing.assert_allclose(f_based["f.weight"], f_plain["f.weight"], rtol=1e-6, atol=1e-7)
    params["dbb_1x1_kxk.idconv1.weight"][...] = 0  # zero stored weight: the identity
    y = block_forward(Block("", "B", (based.body[0].branches[0][0],)), params, x, "train")
    np.testing.assert_array_equal(y, x)


def test_yolov6_kept_bn_is_the_same_function() -> None:
    folded = official_block("yolov6.QARepVGGBlockV2", 8, 8)
    kept = official_block("yolov6.QARepVGGBlockV2", 8, 8, keep_post_bn=True)
    params = random_state(folded, "train", seed=2)
    assert set(params) == set(block_schema(kept, "train"))
    x = np.random.default_rng(1).standard_normal((1, 8, 7, 7))
    y = block_forward(folded, params, x, "train")
    np.testing.assert_allclose(block_forward(kept, params, x, "train"), y, rtol=1e-12)
    fk = reparameterize_state(kept, params)
    np.testing.assert_array_equal(fk["bn.weight"], params["bn.weight"])  # kept as it is
    assert np.abs(block_forward(kept, fk, x, "deploy") - y).max() <= 1e-5 * np.abs(y).max()


# ----------------------------------------------------------------------------- validation


class PReLU:  # stands for nn.PReLU (activations are recognised by class name)
    pass


class ReLU:
    pass


def test_unknown_class_lists_the_accepted_ones() -> None:
    with pytest.raises(SpecError, match="ACBlock.*DiverseBranchBlock.*yolov6.QARepVGGBlockV2"):
        official_block("ResNetBlock", 8, 8)
    with pytest.raises(SpecError, match="did you mean ACBlock"):
        official_block("ACBlok", 8, 8, 3)


def test_unknown_or_missing_argument_lists_the_accepted_arguments() -> None:
    with pytest.raises(
        SpecError,
        match=r"ACBlock: .*'bias'.*accepted arguments: in_channels, "
        r"out_channels, kernel_size, stride=1, .*use_last_bn=False",
    ):
        official_block("ACBlock", 8, 8, 3, padding=1, bias=True)
    with pytest.raises(SpecError, match="DiverseBranchBlock: .*kernel_size.*internal_channels_1x1_3x3"):
        official_block("DiverseBranchBlock", 8, 8)
    with pytest.raises(SpecError, match="keep_post_bn=False"):
        official_block("yolov6.QARepVGGBlock", 8, 8, keep_bn=True)


def test_positional_arguments_follow_the_official_order() -> None:
    assert official_block("ACBlock", 8, 16, 5, 2, 3) == official_block(
        "ACBlock", in_channels=8, out_channels=16, kernel_size=5, stride=2, padding=3
    )


BAD = [  # (class, args, kwargs, the value the message must name)
    ("RepVGGBlock", (8, 8, 5), dict(padding=2), "kernel_size=5"),
    ("RepVGGBlock", (8, 8, 3), {}, "padding=0"),
    ("RepVGGBlock", (8, 8, 3), dict(padding=1, dilation=2), "dilation=2"),
    ("RepVGGBlock", (8, 8, 3), dict(padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    ("RepVGGBlock", (8, 8, 3), dict(padding=1, use_se=True), "use_se=True"),
    ("RepVGGBlock", (8, 12, 3), dict(padding=1, groups=8), "groups=8"),
    ("RepVGGBlock", (8, 8, 3), dict(padding=1, deploy=True), "deploy=True"),
    ("RepConv", (8, 8), dict(k=5), "k=5"),
    ("RepConv", (8, 8), dict(p=0), "p=0"),
    ("RepConv", (8, 8), dict(act="relu"), "act='relu'"),
    ("RepConv", (8, 8), dict(act=PReLU()), "act="),
    ("RepGhostModule", (8, 8), dict(dw_size=4), "dw_size=4"),
    ("RepGhostModule", (0, 8), {}, "inp=0"),
    ("QARepVGGBlockV2", (8, 8, 3), dict(padding=1, use_se=True), "use_se=True"),
    ("QARepVGGBlockV2", (8, 8, 3), dict(padding=1, act=PReLU), "act="),
    ("QARepVGGBlockV2", (8, 8, 3), dict(padding=1, drop_path_ratio=1.0), "drop_path_ratio=1.0"),
    ("yolov6.QARepVGGBlock", (8, 8), dict(use_se=True), "NotImplementedError"),
    ("yolov6.QARepVGGBlockV2", (8, 8), dict(kernel_size=5), "kernel_size=5"),
    ("DiverseBranchBlock", (8, 8, 3), {}, "padding=0"),
    ("DiverseBranchBlock", (8, 8, 4), dict(padding=2), "kernel_size=4"),
    ("DiverseBranchBlock", (8, 8, 3), dict(padding=1, dilation=2), "dilation=2"),
    ("DiverseBranchBlock", (16, 8, 3), dict(padding=1, groups=8), "groups=8"),
    (
        "DiverseBranchBlock",
        (8, 8, 3),
        dict(padding=1, groups=2, internal_channels_1x1_3x3=5),
        "internal_channels_1x1_3x3=5",
    ),
    ("DiverseBranchBlock", (8, 8, 3), dict(padding=1, nonlinear=PReLU()), "nonlinear="),
    ("ACBlock", (8, 8, 3), dict(padding=0), "padding=0"),
    ("ACBlock", (8, 8, 4), dict(padding=2), "kernel_size=4"),
    ("ACBlock", (8, 8, 3), dict(padding=1, dilation=2), "dilation=2"),
    ("ACBlock", (8, 8, 3), dict(padding=1, padding_mode="circular"), "padding_mode='circular'"),
    ("ACBlock", (8, 8, 3), dict(padding=1, use_affine=False), "use_affine=False"),
    ("ACBlock", (8, 8, 3), dict(padding=1, reduce_gamma=True, gamma_init=0.5), "reduce_gamma=True"),
    ("ACBlock", (8, 8, 3), dict(padding=1, deploy=True), "deploy=True"),
]


@pytest.mark.parametrize("cls,args,kwargs,value", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_values_are_spec_errors_naming_them(cls, args, kwargs, value) -> None:
    with pytest.raises(SpecError) as err:
        official_block(cls, *args, **kwargs)
    assert cls.split(".")[-1] in str(err.value) and value in str(err.value)


def test_accepted_init_only_arguments_and_activation_modules() -> None:
    base = official_block("ACBlock", 8, 8, 3, padding=1)
    assert official_block("ACBlock", 8, 8, 3, padding=1, reduce_gamma=True) == base
    assert official_block("ACBlock", 8, 8, 3, padding=1, gamma_init=0.3) == base
    dbb = official_block("DiverseBranchBlock", 8, 8, 3, padding=1, nonlinear=ReLU(), single_init=True)
    assert dbb.act == "relu"
    assert official_block("QARepVGGBlockV2", 8, 8, 3, padding=1, act=ReLU).act == "relu"
    assert official_block("RepConv", 8, 8, act=False).act == "identity"
    assert official_block("RepConv", 8, 8).eps == 1e-5 and official_block("RepConv", 8, 8).act == "silu"
