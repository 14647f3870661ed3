"""Official naming: the modules' state_dicts (num_batches_tracked included, as in official
checkpoints) equal those of the official PyTorch code, derived here independently of
reparam_core from the official constructors (DingXiaoH/RepVGG repvgg.py / repvggplus.py /
se_block.py, ChengpengChen/RepGhost model/repghost.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import backends.torch as bt
from reparam_core import RepBlockSpec, RepGhostBottleneckSpec, RepGhostModuleSpec

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
Keys = dict[str, tuple[int, ...]]


def _bn(prefix: str, c: int) -> Keys:
    return {f"{prefix}.{f}": (() if f == "num_batches_tracked" else (c,)) for f in BN}


def official_repvgg(num_blocks, widths, groups: int = 1, use_se: bool = False, deploy: bool = False) -> Keys:
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
            keys.update(
                {
                    f"{prefix}.se.down.weight": (hidden, cout, 1, 1),
                    f"{prefix}.se.down.bias": (hidden,),
                    f"{prefix}.se.up.weight": (cout, hidden, 1, 1),
                    f"{prefix}.se.up.bias": (cout,),
                }
            )

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


CFGS = [
    [[3, 8, 16, 0, 1]],
    [[3, 24, 24, 0, 2]],
    [[3, 36, 24, 0, 1]],
    [[5, 36, 40, 0.25, 2]],
    [[5, 60, 40, 0.25, 1]],
    [[3, 120, 80, 0, 2]],
    [[3, 100, 80, 0, 1], [3, 120, 80, 0, 1], [3, 120, 80, 0, 1], [3, 240, 112, 0.25, 1], [3, 336, 112, 0.25, 1]],
    [[5, 336, 160, 0.25, 2]],
    [[5, 480, 160, 0, 1], [5, 480, 160, 0.25, 1], [5, 480, 160, 0, 1], [5, 480, 160, 0.25, 1]],
]


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
                keys.update(
                    {
                        f"{p}.se.conv_reduce.weight": (red, mid, 1, 1),
                        f"{p}.se.conv_reduce.bias": (red,),
                        f"{p}.se.conv_expand.weight": (mid, red, 1, 1),
                        f"{p}.se.conv_expand.bias": (mid,),
                    }
                )
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
    keys.update(
        {
            "conv_head.weight": (1280, last, 1, 1),
            "conv_head.bias": (1280,),
            "classifier.weight": (1000, 1280),
            "classifier.bias": (1000,),
        }
    )
    return keys


OFFICIAL = {
    "RepVGG-A0": lambda d: official_repvgg((2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5), deploy=d),
    "RepVGG-B1g4": lambda d: official_repvgg((4, 6, 16, 1), (2, 2, 2, 4), groups=4, deploy=d),
    "RepVGG-D2se": lambda d: official_repvgg((8, 14, 24, 1), (2.5, 2.5, 2.5, 5), use_se=True, deploy=d),
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


@pytest.mark.parametrize(
    "name, train_m, deploy_m",
    [
        ("RepVGG-A0", 9.11, 8.31),
        ("RepVGG-B1g4", 39.97, 36.13),
        ("repghostnet_1_0x", 4.07, 4.06),
        ("repghostnet_0_5x", 2.31, 2.31),
    ],
)
def test_parameter_counts(name: str, train_m: float, deploy_m: float) -> None:
    for deploy, expected in ((False, train_m), (True, deploy_m)):
        with torch.device("meta"):
            model = bt.create_model(name, deploy=deploy)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == expected


# Official block keys written out (repvgg.py RepVGGBlock / SEBlock, repvggplus.py RepVGGplusBlock,
# yolov7 models/common.py RepConv, repghost.py RepGhostModule / RepGhostBottleneck), shapes by hand.
BLOCKS: dict[str, tuple[object, Keys, Keys]] = {
    "repvgg-identity": (
        RepBlockSpec(4, 4),
        {
            "rbr_dense.conv.weight": (4, 4, 3, 3),
            **_bn("rbr_dense.bn", 4),
            "rbr_1x1.conv.weight": (4, 4, 1, 1),
            **_bn("rbr_1x1.bn", 4),
            **_bn("rbr_identity", 4),
        },
        {"rbr_reparam.weight": (4, 4, 3, 3), "rbr_reparam.bias": (4,)},
    ),
    "repvgg-g2-s2": (
        RepBlockSpec(4, 8, stride=2, groups=2),
        {
            "rbr_dense.conv.weight": (8, 2, 3, 3),
            **_bn("rbr_dense.bn", 8),
            "rbr_1x1.conv.weight": (8, 2, 1, 1),
            **_bn("rbr_1x1.bn", 8),
        },
        {"rbr_reparam.weight": (8, 2, 3, 3), "rbr_reparam.bias": (8,)},
    ),
    "repvgg-se": (
        RepBlockSpec(16, 16, se="pre", se_channels=1),
        {
            "rbr_dense.conv.weight": (16, 16, 3, 3),
            **_bn("rbr_dense.bn", 16),
            "rbr_1x1.conv.weight": (16, 16, 1, 1),
            **_bn("rbr_1x1.bn", 16),
            **_bn("rbr_identity", 16),
            "se.down.weight": (1, 16, 1, 1),
            "se.down.bias": (1,),
            "se.up.weight": (16, 1, 1, 1),
            "se.up.bias": (16,),
        },
        {
            "rbr_reparam.weight": (16, 16, 3, 3),
            "rbr_reparam.bias": (16,),
            "se.down.weight": (1, 16, 1, 1),
            "se.down.bias": (1,),
            "se.up.weight": (16, 1, 1, 1),
            "se.up.bias": (16,),
        },
    ),
    "repvggplus-post-se": (
        RepBlockSpec(8, 16, stride=2, se="post", se_channels=4),
        {
            "rbr_dense.conv.weight": (16, 8, 3, 3),
            **_bn("rbr_dense.bn", 16),
            "rbr_1x1.conv.weight": (16, 8, 1, 1),
            **_bn("rbr_1x1.bn", 16),
            "post_se.down.weight": (4, 16, 1, 1),
            "post_se.down.bias": (4,),
            "post_se.up.weight": (16, 4, 1, 1),
            "post_se.up.bias": (16,),
        },
        {
            "rbr_reparam.weight": (16, 8, 3, 3),
            "rbr_reparam.bias": (16,),
            "post_se.down.weight": (4, 16, 1, 1),
            "post_se.down.bias": (4,),
            "post_se.up.weight": (16, 4, 1, 1),
            "post_se.up.bias": (16,),
        },
    ),
    "repconv-identity": (
        bt.repconv_spec(8, 8),
        {
            "rbr_dense.0.weight": (8, 8, 3, 3),
            **_bn("rbr_dense.1", 8),
            "rbr_1x1.0.weight": (8, 8, 1, 1),
            **_bn("rbr_1x1.1", 8),
            **_bn("rbr_identity", 8),
        },
        {"rbr_reparam.weight": (8, 8, 3, 3), "rbr_reparam.bias": (8,)},
    ),
    "repconv-g2-s2": (
        bt.repconv_spec(8, 16, stride=2, groups=2),
        {
            "rbr_dense.0.weight": (16, 4, 3, 3),
            **_bn("rbr_dense.1", 16),
            "rbr_1x1.0.weight": (16, 4, 1, 1),
            **_bn("rbr_1x1.1", 16),
        },
        {"rbr_reparam.weight": (16, 4, 3, 3), "rbr_reparam.bias": (16,)},
    ),
    "ghost-module": (
        RepGhostModuleSpec(4, 8),
        {
            "primary_conv.0.weight": (8, 4, 1, 1),
            **_bn("primary_conv.1", 8),
            "cheap_operation.0.weight": (8, 1, 3, 3),
            **_bn("cheap_operation.1", 8),
            **_bn("fusion_bn.0", 8),
        },
        {
            "primary_conv.0.weight": (8, 4, 1, 1),
            **_bn("primary_conv.1", 8),
            "cheap_operation.weight": (8, 1, 3, 3),
            "cheap_operation.bias": (8,),
        },
    ),
    "ghost-bottleneck-s2-se": (
        RepGhostBottleneckSpec(8, 16, 12, 3, 2, 4),
        {
            "ghost1.primary_conv.0.weight": (16, 8, 1, 1),
            **_bn("ghost1.primary_conv.1", 16),
            "ghost1.cheap_operation.0.weight": (16, 1, 3, 3),
            **_bn("ghost1.cheap_operation.1", 16),
            **_bn("ghost1.fusion_bn.0", 16),
            "conv_dw.weight": (16, 1, 3, 3),
            **_bn("bn_dw", 16),
            "se.conv_reduce.weight": (4, 16, 1, 1),
            "se.conv_reduce.bias": (4,),
            "se.conv_expand.weight": (16, 4, 1, 1),
            "se.conv_expand.bias": (16,),
            "ghost2.primary_conv.0.weight": (12, 16, 1, 1),
            **_bn("ghost2.primary_conv.1", 12),
            "ghost2.cheap_operation.0.weight": (12, 1, 3, 3),
            **_bn("ghost2.cheap_operation.1", 12),
            **_bn("ghost2.fusion_bn.0", 12),
            "shortcut.0.weight": (8, 1, 3, 3),
            **_bn("shortcut.1", 8),
            "shortcut.2.weight": (12, 8, 1, 1),
            **_bn("shortcut.3", 12),
        },
        {
            "ghost1.primary_conv.0.weight": (16, 8, 1, 1),
            **_bn("ghost1.primary_conv.1", 16),
            "ghost1.cheap_operation.weight": (16, 1, 3, 3),
            "ghost1.cheap_operation.bias": (16,),
            "conv_dw.weight": (16, 1, 3, 3),
            **_bn("bn_dw", 16),
            "se.conv_reduce.weight": (4, 16, 1, 1),
            "se.conv_reduce.bias": (4,),
            "se.conv_expand.weight": (16, 4, 1, 1),
            "se.conv_expand.bias": (16,),
            "ghost2.primary_conv.0.weight": (12, 16, 1, 1),
            **_bn("ghost2.primary_conv.1", 12),
            "ghost2.cheap_operation.weight": (12, 1, 3, 3),
            "ghost2.cheap_operation.bias": (12,),
            "shortcut.0.weight": (8, 1, 3, 3),
            **_bn("shortcut.1", 8),
            "shortcut.2.weight": (12, 8, 1, 1),
            **_bn("shortcut.3", 12),
        },
    ),
}


def official_checkpoint(keys: Keys, seed: int = 0) -> dict[str, torch.Tensor]:
    """An official-style torch checkpoint built from key names and shapes alone: random weights,
    positive running_var, int64 num_batches_tracked (as official training leaves it)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7 + len(out), dtype=torch.long)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


def _load_strict_exact(module: torch.nn.Module, ckpt: dict[str, torch.Tensor]) -> None:
    module.load_state_dict(ckpt, strict=True)
    got = module.state_dict()
    assert set(got) == set(ckpt)
    for k, v in ckpt.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def _official_bn(ck: dict, prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.batch_norm(
        x,
        ck[f"{prefix}.running_mean"],
        ck[f"{prefix}.running_var"],
        ck[f"{prefix}.weight"],
        ck[f"{prefix}.bias"],
        False,
        0.0,
        eps,
    )


def official_forward(name: str, ck: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The official eval-mode forward, written from the official code and reading the checkpoint
    by its official names only (same-shaped tensors, e.g. the dense and 1x1 BNs, are told apart
    here by name, not by shape)."""
    if name.startswith(("repvgg", "repconv")):
        conv, bn = ("conv", "bn") if name.startswith("repvgg") else ("0", "1")
        spec = BLOCKS[name][0]
        s, g, eps = spec.stride, spec.groups, spec.eps
        y = _official_bn(ck, f"rbr_dense.{bn}", F.conv2d(x, ck[f"rbr_dense.{conv}.weight"], None, s, 1, 1, g), eps)
        y = y + _official_bn(ck, f"rbr_1x1.{bn}", F.conv2d(x, ck[f"rbr_1x1.{conv}.weight"], None, s, 0, 1, g), eps)
        if "rbr_identity.weight" in ck:
            y = y + _official_bn(ck, "rbr_identity", x, eps)
        return F.silu(y) if name.startswith("repconv") else F.relu(y)
    assert name == "ghost-module"
    x1 = F.relu(_official_bn(ck, "primary_conv.1", F.conv2d(x, ck["primary_conv.0.weight"]), 1e-5))
    x2 = _official_bn(
        ck, "cheap_operation.1", F.conv2d(x1, ck["cheap_operation.0.weight"], None, 1, 1, 1, x1.shape[1]), 1e-5
    )
    return F.relu(x2 + _official_bn(ck, "fusion_bn.0", x1, 1e-5))


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_keys_are_the_written_out_official_keys(name: str, deploy: bool) -> None:
    """Each block's state_dict keys and shapes are exactly the official ones written out above,
    and an official-style checkpoint built from those keys alone loads strict, value for value."""
    spec, train_keys, deploy_keys = BLOCKS[name]
    expected = deploy_keys if deploy else train_keys
    block = bt.build_block(spec, deploy=deploy)
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == expected
    _load_strict_exact(block, official_checkpoint(expected, seed=len(name)))


@pytest.mark.parametrize(
    "name", ["repvgg-identity", "repvgg-g2-s2", "repconv-identity", "repconv-g2-s2", "ghost-module"]
)
def test_official_checkpoint_keys_mean_what_they_say(name: str) -> None:
    """An official-style train checkpoint (keys from BLOCKS, not from the module) computes, once
    loaded, the official forward read from the checkpoint by name: a mix-up between tensors of
    the same shape (dense vs 1x1 BN, fusion_bn vs cheap_operation.1) fails here."""
    spec, train_keys, _ = BLOCKS[name]
    ck = official_checkpoint(train_keys, seed=3)
    block = bt.build_block(spec).eval()
    _load_strict_exact(block, ck)
    x = torch.randn(2, spec.in_channels, 9, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(block(x), official_forward(name, ck, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize(
    "name, official",
    [
        ("RepVGG-mini", lambda d: official_repvgg((1, 2, 2, 1), (0.25, 0.25, 0.25, 0.5), deploy=d)),
        ("repghostnet_0_5x", OFFICIAL["repghostnet_0_5x"]),
    ],
)
def test_official_style_checkpoint_loads_strict(name: str, official, deploy: bool) -> None:
    """A whole-model checkpoint built from the independently derived official keys and shapes
    (num_batches_tracked included) loads strict into the model, every tensor where its key says."""
    ckpt = official_checkpoint(official(deploy), seed=5)
    assert "linear.weight" in ckpt or "blocks.0.0.ghost1.primary_conv.0.weight" in ckpt
    _load_strict_exact(bt.create_model(name, deploy=deploy), ckpt)
