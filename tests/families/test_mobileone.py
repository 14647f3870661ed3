"""MobileOne-S0 ... S4 (apple/ml-mobileone) as data: official key names derived by hand from the
official code, parameter counts against published figures, timm / mmpretrain names both ways,
the official MobileOneBlock constructor, and the deploy artifacts of S0 (ONNX from torch,
StableHLO from Flax; the traced .mge is in tests/megengine/test_mge_export.py). The train and
deploy forms against the float64 oracle in all three backends are in tests/backends (S0 and the
official blocks by default, S1..S4 with --slow) and in the parity matrix."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from parity_tests.backend_rule import require_module
from parity_tests.tolerance import model_tolerance, rel_err
from reparam_core import (
    SpecError,
    block_schema,
    count_params,
    get_spec,
    official_block,
    random_state,
    reparameterize_state,
    state_schema,
)
from reparam_core.blocks.oracle import forward
from reparam_core.families.official import official_signature
from reparam_core.weights.keymaps import from_canonical, map_key, schemes_for, to_canonical

BN = ("weight", "bias", "running_mean", "running_var")


def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{f}": (c,) for f in BN}


def conv_bn(prefix: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.conv.weight": shape, **bn(f"{prefix}.bn", shape[0])}


def shapes(spec, form: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """The schema entries of one block of a model (full keys), in order."""
    return {k: t.shape for k, t in state_schema(spec, form).items() if k.startswith(prefix + ".")}


# ----------------------------------------------------------------------------- official names
# From apple/ml-mobileone mobileone.py, by hand: the stem is MobileOneBlock(3, 48, 3, stride=2,
# padding=1) with the default num_conv_branches=1 (S0 width 0.75 -> min(64, 48)); stage1 holds
# 2 pairs of (depthwise 3x3 on 48 channels, pointwise 1x1 48 -> int(64 * 0.75) = 48), 4 conv
# branches each in S0; the first depthwise block has stride 2 (no rbr_skip), a 1x1 block has no
# rbr_scale; a module's keys come in the order rbr_skip, rbr_conv.i, rbr_scale.

S0_STEM_TRAIN = {**conv_bn("stage0.rbr_conv.0", (48, 3, 3, 3)), **conv_bn("stage0.rbr_scale", (48, 3, 1, 1))}
S0_STAGE1_0 = {
    **{k: v for i in range(4) for k, v in conv_bn(f"stage1.0.rbr_conv.{i}", (48, 1, 3, 3)).items()},
    **conv_bn("stage1.0.rbr_scale", (48, 1, 1, 1)),
}
S0_STAGE1_1 = {
    **bn("stage1.1.rbr_skip", 48),
    **{k: v for i in range(4) for k, v in conv_bn(f"stage1.1.rbr_conv.{i}", (48, 48, 1, 1)).items()},
}
S0_STAGE1_2 = {
    **bn("stage1.2.rbr_skip", 48),
    **{k: v for i in range(4) for k, v in conv_bn(f"stage1.2.rbr_conv.{i}", (48, 1, 3, 3)).items()},
    **conv_bn("stage1.2.rbr_scale", (48, 1, 1, 1)),
}


def test_s0_stem_and_stage1_keys_are_the_official_ones() -> None:
    spec = get_spec("MobileOne-S0")
    assert shapes(spec, "train", "stage0") == S0_STEM_TRAIN
    assert list(shapes(spec, "train", "stage0")) == list(S0_STEM_TRAIN)
    assert shapes(spec, "train", "stage1.0") == S0_STAGE1_0
    assert list(shapes(spec, "train", "stage1.1")) == list(S0_STAGE1_1)
    assert shapes(spec, "train", "stage1.1") == S0_STAGE1_1
    assert shapes(spec, "train", "stage1.2") == S0_STAGE1_2
    assert shapes(spec, "deploy", "stage0") == {
        "stage0.reparam_conv.weight": (48, 3, 3, 3),
        "stage0.reparam_conv.bias": (48,),
    }
    assert shapes(spec, "deploy", "stage1.1") == {
        "stage1.1.reparam_conv.weight": (48, 48, 1, 1),
        "stage1.1.reparam_conv.bias": (48,),
    }
    # stage1 = 2 pairs, stage2 = 8 pairs (48 -> 128), stage4 = 1 pair (256 -> 1024), head
    blocks = {k.split(".rbr")[0].split(".reparam")[0] for k in state_schema(spec, "deploy")}
    assert blocks == {
        "stage0",
        "linear.weight",
        "linear.bias",
        *(f"stage{s}.{j}" for s, n in ((1, 4), (2, 16), (3, 20), (4, 2)) for j in range(n)),
    }
    assert shapes(spec, "train", "stage2.1")["stage2.1.rbr_conv.3.conv.weight"] == (128, 48, 1, 1)
    assert "stage2.1.rbr_skip.weight" not in state_schema(spec, "train")  # 48 != 128
    assert state_schema(spec, "deploy")["stage4.1.reparam_conv.weight"].shape == (1024, 256, 1, 1)
    assert state_schema(spec, "deploy")["linear.weight"].shape == (1000, 1024)


# S4 (widths 3.0, 3.5, 3.5, 4.0; use_se): stage3 = 10 pairs on int(256 * 3.5) = 896 channels,
# SE on the last 10 // 2 = 5 pairs (modules stage3.10 ... stage3.19, both blocks of a pair);
# stage4 = 1 pair 896 -> 2048 with SE. SEBlock(C): reduce C -> int(C * 0.0625), expand back,
# both 1x1 with bias. One conv branch (num_conv_branches=1).
S4_STAGE3_10 = {
    **bn("stage3.10.rbr_skip", 896),
    **conv_bn("stage3.10.rbr_conv.0", (896, 1, 3, 3)),
    **conv_bn("stage3.10.rbr_scale", (896, 1, 1, 1)),
    "stage3.10.se.reduce.weight": (56, 896, 1, 1),
    "stage3.10.se.reduce.bias": (56,),
    "stage3.10.se.expand.weight": (896, 56, 1, 1),
    "stage3.10.se.expand.bias": (896,),
}


def test_s4_se_blocks_are_the_official_ones() -> None:
    spec = get_spec("MobileOne-S4")
    assert shapes(spec, "train", "stage3.10") == S4_STAGE3_10
    se = {
        "stage3.10.se.reduce.weight": (56, 896, 1, 1),
        "stage3.10.se.reduce.bias": (56,),
        "stage3.10.se.expand.weight": (896, 56, 1, 1),
        "stage3.10.se.expand.bias": (896,),
    }
    assert shapes(spec, "deploy", "stage3.10") == {
        "stage3.10.reparam_conv.weight": (896, 1, 3, 3),
        "stage3.10.reparam_conv.bias": (896,),
        **se,
    }
    train = state_schema(spec, "train")
    with_se = sorted({k.split(".se.")[0] for k in train if ".se." in k})
    assert with_se == sorted([f"stage3.{j}" for j in range(10, 20)] + ["stage4.0", "stage4.1"])
    assert train["stage4.1.se.reduce.weight"].shape == (128, 2048, 1, 1)
    assert train["stage4.0.se.expand.weight"].shape == (896, 56, 1, 1)
    for other in ("S0", "S1", "S2", "S3"):
        assert not any(".se." in k for k in state_schema(get_spec(f"MobileOne-{other}"), "train"))


# ----------------------------------------------------------------------------- parameter counts
# Deploy: mmpretrain configs/mobileone/metafile.yml `Parameters` (exact integers; S0 2.08M, the
# paper's 2.1M). Train: timm results/results-imagenet.csv `param_count` of mobileone_s*.apple_in1k
# (the unfused timm models, millions to 2 decimals). BN running statistics are not parameters.
DEPLOY_PARAMS = {"S0": 2078504, "S1": 4764840, "S2": 7808168, "S3": 10078312, "S4": 14838352}
TRAIN_PARAMS_M = {"S0": 5.29, "S1": 4.83, "S2": 7.88, "S3": 10.17, "S4": 14.95}


@pytest.mark.parametrize("variant", list(DEPLOY_PARAMS))
def test_parameter_counts_match_published_figures(variant: str) -> None:
    spec = get_spec(f"MobileOne-{variant}")
    assert count_params(spec, "deploy") == DEPLOY_PARAMS[variant]
    assert round(count_params(spec, "train") / 1e6, 2) == TRAIN_PARAMS_M[variant]


def test_registry_names_and_timm_aliases() -> None:
    for v in range(5):
        spec = get_spec(f"mobileone_s{v}")
        assert spec.name == f"MobileOne-S{v}"
        assert get_spec(f"MOBILEONE-s{v}", 7).num_classes == 7


# ----------------------------------------------------------------------------- key maps
# Foreign names written from the sources: timm byobnet.py (MobileOneBlock: conv_kxk.i, conv_scale,
# identity, reparam_conv, attn.fc1/fc2; stem, stages.i.j, head.fc) and mmpretrain
# backbones/mobileone.py in an ImageClassifier (backbone.stageN.j; branch_conv_list.i.conv/norm,
# branch_scale, branch_norm, branch_reparam, se.conv1.conv/conv2.conv; head.fc).
FOREIGN = {
    "timm": [
        ("stem.conv_kxk.0.conv.weight", "stage0.rbr_conv.0.conv.weight"),
        ("stem.conv_scale.bn.running_var", "stage0.rbr_scale.bn.running_var"),
        ("stem.reparam_conv.bias", "stage0.reparam_conv.bias"),
        ("stages.0.0.conv_kxk.3.bn.weight", "stage1.0.rbr_conv.3.bn.weight"),
        ("stages.0.1.identity.running_mean", "stage1.1.rbr_skip.running_mean"),
        ("stages.1.15.reparam_conv.weight", "stage2.15.reparam_conv.weight"),
        ("stages.2.10.attn.fc1.weight", "stage3.10.se.reduce.weight"),
        ("stages.3.1.attn.fc2.bias", "stage4.1.se.expand.bias"),
        ("head.fc.weight", "linear.weight"),
    ],
    "mmpretrain": [
        ("backbone.stage0.branch_conv_list.0.conv.weight", "stage0.rbr_conv.0.conv.weight"),
        ("backbone.stage0.branch_scale.norm.bias", "stage0.rbr_scale.bn.bias"),
        ("backbone.stage0.branch_reparam.weight", "stage0.reparam_conv.weight"),
        ("backbone.stage1.0.branch_conv_list.3.norm.running_mean", "stage1.0.rbr_conv.3.bn.running_mean"),
        ("backbone.stage1.1.branch_norm.running_var", "stage1.1.rbr_skip.running_var"),
        ("backbone.stage2.5.branch_scale.conv.weight", "stage2.5.rbr_scale.conv.weight"),
        ("backbone.stage3.10.se.conv1.conv.weight", "stage3.10.se.reduce.weight"),
        ("backbone.stage4.1.se.conv2.conv.bias", "stage4.1.se.expand.bias"),
        ("head.fc.bias", "linear.bias"),
    ],
}


@pytest.mark.parametrize("scheme", list(FOREIGN))
def test_foreign_names_map_both_ways(scheme: str) -> None:
    spec = get_spec("MobileOne-S4")
    rules = schemes_for(spec)[scheme]
    for foreign, canonical in FOREIGN[scheme]:
        assert map_key(foreign, rules) == canonical
        assert map_key(canonical, rules, reverse=True) == foreign


@pytest.mark.parametrize("scheme", list(FOREIGN))
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_foreign_checkpoint_is_detected_and_converted_back(scheme: str, form: str) -> None:
    spec = get_spec("MobileOne-S0")
    state = random_state(spec, form, seed=1)
    foreign = from_canonical(state, spec, scheme)
    assert not set(foreign) & set(state)  # every key renamed (the heads and the stem too)
    back, found = to_canonical(foreign, spec)
    assert found == scheme
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)


# ----------------------------------------------------------------------------- official_block

OFFICIAL_ARGS = [
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "inference_mode",
    "use_se",
    "num_conv_branches",
]


def test_official_signature_is_the_official_one() -> None:
    sig = official_signature("MobileOneBlock")
    assert list(sig.parameters) == OFFICIAL_ARGS
    assert {k: p.default for k, p in sig.parameters.items() if p.default is not p.empty} == {
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "groups": 1,
        "inference_mode": False,
        "use_se": False,
        "num_conv_branches": 1,
    }


def test_official_block_keys_equal_the_official_class_keys() -> None:
    spec = official_block("MobileOneBlock", 32, 32, 3, padding=1, groups=32, use_se=True, num_conv_branches=2)
    expected = {
        **bn("rbr_skip", 32),
        **conv_bn("rbr_conv.0", (32, 1, 3, 3)),
        **conv_bn("rbr_conv.1", (32, 1, 3, 3)),
        **conv_bn("rbr_scale", (32, 1, 1, 1)),
        "se.reduce.weight": (2, 32, 1, 1),
        "se.reduce.bias": (2,),
        "se.expand.weight": (32, 2, 1, 1),
        "se.expand.bias": (32,),
    }
    assert {k: t.shape for k, t in block_schema(spec, "train").items()} == expected
    deploy = {
        "se.reduce.weight": (2, 32, 1, 1),
        "se.reduce.bias": (2,),
        "se.expand.weight": (32, 2, 1, 1),
        "se.expand.bias": (32,),
        "reparam_conv.weight": (32, 1, 3, 3),
        "reparam_conv.bias": (32,),
    }
    assert {k: t.shape for k, t in block_schema(spec, "deploy").items()} == deploy
    # inference_mode=True: the official class holds the deploy form only
    inference = official_block("mobileoneblock", 32, 32, 3, 1, 1, 1, 32, True, True, 2)
    assert {k: t.shape for k, t in block_schema(inference, "train").items()} == deploy
    # a pointwise block with in != out: one conv branch, no scale, no skip
    pw = official_block("MobileOneBlock", in_channels=8, out_channels=16, kernel_size=1)
    assert {k: t.shape for k, t in block_schema(pw, "train").items()} == conv_bn("rbr_conv.0", (16, 8, 1, 1))


def test_official_block_is_the_block_of_the_model() -> None:
    spec = get_spec("MobileOne-S0")
    assert official_block("MobileOneBlock", 3, 48, 3, stride=2, padding=1) == spec.stem
    assert official_block("MobileOneBlock", 48, 48, 3, 2, 1, groups=48, num_conv_branches=4) == spec.stages[0][0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(deploy=True),
            r"MobileOneBlock: .*deploy.*accepted arguments: in_channels, "
            r"out_channels, kernel_size, stride=1, padding=0",
        ),
        (dict(dilation=2), r"dilation must be 1: .* \(got 2\)"),
        (dict(padding=0), r"padding must be kernel_size // 2 = 1 .* got 0"),
        (dict(kernel_size=2, padding=1), r"kernel_size must be 1 or odd .* got 2"),
        (dict(groups=3), r"channels 8 -> 8 are not divisible by groups=3"),
        (dict(use_se=True), r"use_se needs out_channels >= 16"),
        (dict(num_conv_branches=0), r"num_conv_branches must be >= 1, got 0"),
        (dict(use_se="yes"), r"use_se must be a bool, got 'yes'"),
        (dict(stride=1.5), r"stride must be an int, got 1.5"),
        (dict(padding=-1), r"padding must be >= 0, got -1"),
    ],
)
def test_official_block_rejects_what_the_official_class_cannot_build(kwargs, match) -> None:
    args = dict(in_channels=8, out_channels=8, kernel_size=3, padding=1) | kwargs
    with pytest.raises(SpecError, match=match):
        official_block("MobileOneBlock", **args)


def test_missing_argument_lists_the_accepted_ones() -> None:
    with pytest.raises(SpecError, match=r"missing a required argument: 'kernel_size'.*accepted"):
        official_block("MobileOneBlock", 8, 8)


# ----------------------------------------------------------------------------- deploy artifacts

NAME, CLASSES, SIZE = "MobileOne-S0", 10, 32
N_CONVS = 1 + 2 * (2 + 8 + 10 + 1)  # the stem and every block of the four stages


@pytest.fixture(scope="module")
def s0_deploy() -> tuple:
    """S0's deploy state from the core's fusion, an input and the float64 oracle's logits."""
    spec = get_spec(NAME, CLASSES)
    state = random_state(spec, "train", seed=4)
    x = np.random.default_rng(5).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return spec, reparameterize_state(spec, state), x, forward(spec, state, x, "train")


def test_s0_onnx_is_a_plain_conv_stack(tmp_path, s0_deploy, pytestconfig) -> None:
    onnx = require_module(pytestconfig, "onnx")
    ort = require_module(pytestconfig, "onnxruntime")
    import torch

    import backends.torch as bt

    spec, fused, x, expected = s0_deploy
    with torch.device("meta"):
        model = bt.create_model(NAME, num_classes=CLASSES, deploy=True)
    model = bt.load_state(model.to_empty(device="cpu"), fused)
    path = bt.export_onnx(model, tmp_path / "s0.onnx", input_shape=x.shape)
    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    ops = Counter(n.op_type for n in graph.graph.node)
    assert set(ops) <= {"Conv", "Relu", "GlobalAveragePool", "ReduceMean", "Flatten", "Gemm", "Reshape"}
    assert ops["Conv"] == ops["Relu"] == N_CONVS
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    assert rel_err(y, expected) <= model_tolerance(spec)


def test_s0_stablehlo_is_a_plain_conv_stack(tmp_path, s0_deploy) -> None:
    import backends.flax as bf

    spec, fused, x, expected = s0_deploy
    model = bf.load_state(bf.empty_model(NAME, num_classes=CLASSES, deploy=True), fused)
    fn = bf.load_stablehlo(bf.export_stablehlo(model, tmp_path / "s0.bin", x.shape))
    y = fn(x)
    assert y.shape == (2, CLASSES)
    assert rel_err(y, expected) <= model_tolerance(spec)
    # every deploy conv is one op: XLA's convolution, except the depthwise ones, which the Flax
    # backend computes as shifted multiply-adds on CPU (backends.flax.layers.conv_path)
    from backends.flax.layers import conv_path
    from reparam_core.blocks.nodes import Conv, describe, to_deploy, walk

    convs = [n for _, n in walk(to_deploy(describe(spec))) if isinstance(n, Conv)]
    assert len(convs) == N_CONVS
    xla = [c for c in convs if conv_path(c.groups, c.in_channels) == "xla"]
    assert 0 < len(xla) < N_CONVS
    assert fn.exported.mlir_module().count("stablehlo.convolution") == len(xla)
