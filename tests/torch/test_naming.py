"""Official naming: the modules' state_dicts (num_batches_tracked included, as in official
checkpoints) equal those of the official PyTorch code, derived here independently of
reparam_core from the official constructors (DingXiaoH/RepVGG repvgg.py / repvggplus.py /
se_block.py, ChengpengChen/RepGhost model/repghost.py)."""
from __future__ import annotations

import pytest
import torch

import backends.torch as bt

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
Keys = dict[str, tuple[int, ...]]


def _bn(prefix: str, c: int) -> Keys:
    return {f"{prefix}.{f}": (() if f == "num_batches_tracked" else (c,)) for f in BN}


def official_repvgg(num_blocks, widths, groups: int = 1, use_se: bool = False,
                    deploy: bool = False) -> Keys:
    """repvgg.py: RepVGG._make_stage with cur_layer_idx from 1, groups on layers 2, 4, ..., 26,
    SEBlock(out, internal_neurons=out // 16) as `se.down`/`se.up` (1x1 convs with bias)."""
    keys: Keys = {}

    def block(prefix: str, cin: int, cout: int, stride: int, g: int) -> None:
        if deploy:
            keys[f"{prefix}.rbr_reparam.weight"] = (cout, cin // g, 3, 3)
            keys[f"{prefix}.rbr_reparam.bias"] = (cout,)
        else:
            if cin == cout and stride == 1:
                keys.update(_bn(f"{prefix}.rbr_identity", cin))
            keys[f"{prefix}.rbr_dense.conv.weight"] = (cout, cin // g, 3, 3)
            keys.update(_bn(f"{prefix}.rbr_dense.bn", cout))
            keys[f"{prefix}.rbr_1x1.conv.weight"] = (cout, cin // g, 1, 1)
            keys.update(_bn(f"{prefix}.rbr_1x1.bn", cout))
        if use_se:
            hidden = cout // 16
            keys.update({f"{prefix}.se.down.weight": (hidden, cout, 1, 1),
                         f"{prefix}.se.down.bias": (hidden,),
                         f"{prefix}.se.up.weight": (cout, hidden, 1, 1),
                         f"{prefix}.se.up.bias": (cout,)})

    in_planes = min(64, int(64 * widths[0]))
    block("stage0", 3, in_planes, 2, 1)
    layer = 1
    for i, (base, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
        planes = int(base * widths[i])
        for j in range(n):
            g = groups if layer in range(2, 27, 2) else 1
            block(f"stage{i + 1}.{j}", in_planes, planes, 2 if j == 0 else 1, g)
            in_planes = planes
            layer += 1
    keys["linear.weight"] = (1000, in_planes)
    keys["linear.bias"] = (1000,)
    return keys


def _divisible(v: float, d: int = 4) -> int:
    new_v = max(d, int(v + d / 2) // d * d)
    return new_v + d if new_v < 0.9 * v else new_v


CFGS = [[[3, 8, 16, 0, 1]], [[3, 24, 24, 0, 2]], [[3, 36, 24, 0, 1]], [[5, 36, 40, 0.25, 2]],
        [[5, 60, 40, 0.25, 1]], [[3, 120, 80, 0, 2]],
        [[3, 100, 80, 0, 1], [3, 120, 80, 0, 1], [3, 120, 80, 0, 1], [3, 240, 112, 0.25, 1],
         [3, 336, 112, 0.25, 1]],
        [[5, 336, 160, 0.25, 2]],
        [[5, 480, 160, 0, 1], [5, 480, 160, 0.25, 1], [5, 480, 160, 0, 1], [5, 480, 160, 0.25, 1]]]


def official_repghostnet(width: float, deploy: bool = False) -> Keys:
    """model/repghost.py: RepGhostNet(cfgs, width) with reparam_bn=True, shortcut=True."""
    keys: Keys = {}

    def ghost(prefix: str, cin: int, cout: int) -> None:
        keys[f"{prefix}.primary_conv.0.weight"] = (cout, cin, 1, 1)
        keys.update(_bn(f"{prefix}.primary_conv.1", cout))
        if not deploy:
            keys.update(_bn(f"{prefix}.fusion_bn.0", cout))
            keys[f"{prefix}.cheap_operation.0.weight"] = (cout, 1, 3, 3)
            keys.update(_bn(f"{prefix}.cheap_operation.1", cout))
        else:
            keys[f"{prefix}.cheap_operation.weight"] = (cout, 1, 3, 3)
            keys[f"{prefix}.cheap_operation.bias"] = (cout,)

    stem = _divisible(16 * width)
    keys["conv_stem.weight"] = (stem, 3, 3, 3)
    keys.update(_bn("bn1", stem))
    cin = stem
    for i, cfg in enumerate(CFGS):
        for j, (k, exp, c, se_ratio, s) in enumerate(cfg):
            out, mid, p = _divisible(c * width), _divisible(exp * width), f"blocks.{i}.{j}"
            ghost(f"{p}.ghost1", cin, mid)
            if s > 1:
                keys[f"{p}.conv_dw.weight"] = (mid, 1, k, k)
                keys.update(_bn(f"{p}.bn_dw", mid))
            if se_ratio > 0:
                red = _divisible(mid * se_ratio)
                keys.update({f"{p}.se.conv_reduce.weight": (red, mid, 1, 1),
                             f"{p}.se.conv_reduce.bias": (red,),
                             f"{p}.se.conv_expand.weight": (mid, red, 1, 1),
                             f"{p}.se.conv_expand.bias": (mid,)})
            ghost(f"{p}.ghost2", mid, out)
            if not (cin == out and s == 1):
                keys[f"{p}.shortcut.0.weight"] = (cin, 1, k, k)
                keys.update(_bn(f"{p}.shortcut.1", cin))
                keys[f"{p}.shortcut.2.weight"] = (out, cin, 1, 1)
                keys.update(_bn(f"{p}.shortcut.3", out))
            cin = out
    last = _divisible(480 * width * 2)
    keys[f"blocks.{len(CFGS)}.0.conv.weight"] = (last, cin, 1, 1)
    keys.update(_bn(f"blocks.{len(CFGS)}.0.bn1", last))
    keys.update({"conv_head.weight": (1280, last, 1, 1), "conv_head.bias": (1280,),
                 "classifier.weight": (1000, 1280), "classifier.bias": (1000,)})
    return keys


OFFICIAL = {
    "RepVGG-A0": lambda d: official_repvgg((2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5), deploy=d),
    "RepVGG-B1g4": lambda d: official_repvgg((4, 6, 16, 1), (2, 2, 2, 4), groups=4, deploy=d),
    "RepVGG-D2se": lambda d: official_repvgg((8, 14, 24, 1), (2.5, 2.5, 2.5, 5), use_se=True,
                                             deploy=d),
    "repghostnet_1_0x": lambda d: official_repghostnet(1.0, d),
    "repghostnet_0_5x": lambda d: official_repghostnet(0.5, d),
}


def _native(name: str, deploy: bool) -> Keys:
    with torch.device("meta"):
        model = bt.create_model(name, deploy=deploy)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_equals_official(name: str, deploy: bool) -> None:
    assert _native(name, deploy) == OFFICIAL[name](deploy)


def test_specific_official_keys_and_shapes() -> None:
    a0 = _native("RepVGG-A0", False)
    # 22 blocks x (2 convs + 2 BNs of 5 entries), 17 identity BNs, linear: 22*12 + 17*5 + 2.
    assert len(a0) == 351 and len(_native("RepVGG-A0", True)) == 22 * 2 + 2
    assert a0["stage0.rbr_dense.conv.weight"] == (48, 3, 3, 3)
    assert "stage0.rbr_identity.weight" not in a0 and "stage1.0.rbr_identity.weight" not in a0
    assert a0["stage1.1.rbr_identity.running_var"] == (48,)
    assert a0["stage4.0.rbr_dense.conv.weight"] == (1280, 192, 3, 3)
    assert a0["linear.weight"] == (1000, 1280)
    b1g4 = _native("RepVGG-B1g4", False)
    assert b1g4["stage1.0.rbr_dense.conv.weight"] == (128, 64, 3, 3)  # layer 1: dense
    assert b1g4["stage1.1.rbr_dense.conv.weight"] == (128, 32, 3, 3)  # layer 2: 4 groups
    assert b1g4["stage1.1.rbr_1x1.conv.weight"] == (128, 32, 1, 1)
    assert _native("RepVGG-B1g4", True)["stage1.1.rbr_reparam.weight"] == (128, 32, 3, 3)
    d2se = _native("RepVGG-D2se", False)
    assert d2se["stage1.1.se.down.weight"] == (10, 160, 1, 1)
    assert d2se["stage1.1.se.up.weight"] == (160, 10, 1, 1)
    assert d2se["stage0.se.down.weight"] == (4, 64, 1, 1)
    g10 = _native("repghostnet_1_0x", False)
    assert g10["blocks.0.0.ghost1.primary_conv.0.weight"] == (8, 16, 1, 1)
    assert g10["blocks.0.0.ghost1.fusion_bn.0.running_mean"] == (8,)
    assert g10["blocks.0.0.ghost1.cheap_operation.0.weight"] == (8, 1, 3, 3)
    # mid 36, reduce _make_divisible(9, 4) = 8 < 0.9 * 9, so 12
    assert g10["blocks.3.0.se.conv_reduce.weight"] == (12, 36, 1, 1)
    assert g10["blocks.3.0.conv_dw.weight"] == (36, 1, 5, 5)
    assert g10["blocks.9.0.conv.weight"] == (960, 160, 1, 1)
    g10d = _native("repghostnet_1_0x", True)
    assert g10d["blocks.0.0.ghost1.cheap_operation.weight"] == (8, 1, 3, 3)
    assert g10d["blocks.0.0.ghost1.cheap_operation.bias"] == (8,)
    assert not any("fusion_bn" in k for k in g10d)
    g05 = _native("repghostnet_0_5x", False)
    assert g05["conv_stem.weight"] == (8, 3, 3, 3)
    assert g05["blocks.0.0.ghost1.primary_conv.0.weight"] == (4, 8, 1, 1)
    assert g05["conv_head.weight"] == (1280, 480, 1, 1)


@pytest.mark.parametrize("name, train_m, deploy_m", [
    ("RepVGG-A0", 9.11, 8.31), ("RepVGG-B1g4", 39.97, 36.13), ("repghostnet_1_0x", 4.07, 4.06),
    ("repghostnet_0_5x", 2.31, 2.31)])
def test_parameter_counts(name: str, train_m: float, deploy_m: float) -> None:
    for deploy, expected in ((False, train_m), (True, deploy_m)):
        with torch.device("meta"):
            model = bt.create_model(name, deploy=deploy)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == expected


def test_official_style_checkpoint_loads_strict() -> None:
    """A torch state_dict (with num_batches_tracked) of one module loads strict into another."""
    source = bt.create_model("RepVGG-mini", num_classes=10)
    target = bt.create_model("RepVGG-mini", num_classes=10)
    target.load_state_dict(source.state_dict(), strict=True)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)
