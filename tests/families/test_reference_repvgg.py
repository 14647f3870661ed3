"""Independent references for RepVGGBlock, RepVGGplusBlock, YOLOv7's RepConv, RepGhostModule and
RepGhostBottleneck: each official train-form forward in eval mode, written here in plain torch
functional code from the official semantics (DingXiaoH/RepVGG repvgg.py, repvggplus.py,
se_block.py; WongKinYiu/yolov7 models/common.py; ChengpengChen/RepGhost model/repghost.py),
reading the checkpoint by official key names and the official constructor arguments only.

The library's train and deploy forms must agree with them; deliberately mis-described copies of
the same blocks (two BNs swapped, a tensor-free branch dropped, a wrong epsilon) must not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from family_reference import (
    Checkpoint,
    assert_forms_match,
    assert_mutant_caught,
    block_prefix,
    bn,
    conv,
    drop_branches,
    library_forms,
    mutate,
    official_checkpoint,
    random_input,
    rel_err,
    set_eps_all,
    swap_names,
)

from reparam_core import Block, get_spec, official_block
from reparam_core.blocks.nodes import SE, Act, Node, SpecLike
from reparam_core.families.repghost import RepGhostBottleneckSpec
from reparam_core.families.repvgg import repconv_spec

Tensor = torch.Tensor

# Measured max relative error (float32 library vs float64 reference) over every case below:
# train form 2.7e-7, deploy form 5.2e-7; tolerances about 10x.
TRAIN_TOL = 3e-6
DEPLOY_TOL = 5e-6
TORCH_EPS = 1e-5  # nn.BatchNorm2d's default: every official BN here unless told otherwise


def _repvgg_sum(
    ck: Checkpoint, x: Tensor, out_channels: int, stride: int, groups: int, names: tuple[str, str], eps: float
) -> Tensor:
    """BN_d(conv3x3(x; pad 1)) + BN_1(conv1x1(x; pad 1 - 3 // 2 = 0)) [+ BN_id(x) when in == out
    and stride 1], both convs with `stride` and `groups`; `names` = (conv child, BN child)."""
    child, norm = names
    y = bn(ck, f"rbr_dense.{norm}", conv(ck, f"rbr_dense.{child}", x, stride, 1, groups), eps)
    y = y + bn(ck, f"rbr_1x1.{norm}", conv(ck, f"rbr_1x1.{child}", x, stride, 0, groups), eps)
    if x.shape[1] == out_channels and stride == 1:
        y = y + bn(ck, "rbr_identity", x, eps)
    return y


def _se_block(ck: Checkpoint, prefix: str, y: Tensor, hidden: int) -> Tensor:
    """RepVGG's SEBlock: y * sigmoid(up(relu(down(avg_pool2d(y, kernel = width))))); the pool
    window is W x W (a global mean on square maps only), `hidden` = the official width."""
    assert ck[f"{prefix}.down.weight"].shape[0] == hidden, "SE hidden width is not the official one"
    s = F.avg_pool2d(y, kernel_size=y.shape[3])
    s = torch.sigmoid(conv(ck, f"{prefix}.up", F.relu(conv(ck, f"{prefix}.down", s))))
    return y * s.view(-1, y.shape[1], 1, 1)


def repvgg_block_reference(
    ck: Checkpoint,
    x: Tensor,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    use_se: bool = False,
    use_post_se: bool = False,
) -> Tensor:
    """RepVGGBlock: relu(se(sum)), SE (`se`, out // 16 hidden) before the ReLU with use_se;
    RepVGGplusBlock: post_se(relu(sum)), SE (`post_se`, out // 4 hidden) after it with
    use_post_se (each class takes only its own flag); sum as in _repvgg_sum."""
    assert (kernel_size, padding, x.shape[1]) == (3, 1, in_channels) and not (use_se and use_post_se)
    y = _repvgg_sum(ck, x, out_channels, stride, groups, ("conv", "bn"), TORCH_EPS)
    y = F.relu(_se_block(ck, "se", y, out_channels // 16) if use_se else y)
    return _se_block(ck, "post_se", y, out_channels // 4) if use_post_se else y


def repconv_reference(
    ck: Checkpoint,
    x: Tensor,
    c1: int,
    c2: int,
    k: int = 3,
    s: int = 1,
    p: int | None = None,
    g: int = 1,
    act: Any = True,
    eps: float = TORCH_EPS,
) -> Tensor:
    """YOLOv7 RepConv: act(sum) with children `0` (conv) / `1` (BN); act=True is SiLU, a module
    is applied as is, anything else the identity. `eps`: 1e-5 standalone, 1e-3 once a YOLOv7
    Model's initialize_weights has run."""
    assert k == 3 and (p is None or p == 1) and x.shape[1] == c1
    y = _repvgg_sum(ck, x, c2, s, g, ("0", "1"), eps)
    if act is True:
        return F.silu(y)
    return act(y) if isinstance(act, torch.nn.Module) else y


def repghost_module_reference(
    ck: Checkpoint,
    x: Tensor,
    inp: int,
    oup: int,
    kernel_size: int = 1,
    dw_size: int = 3,
    stride: int = 1,
    relu: bool = True,
    reparam_bn: bool = True,
    reparam_identity: bool = False,
) -> Tensor:
    """RepGhostModule: x1 = act(BN(conv_k(x; stride, pad k // 2))); x2 = BN(dwconv(x1; pad
    dw // 2)) [+ fusion_bn.0(x1)] [+ x1]; act(x2), act = ReLU if relu else the identity."""
    act: Callable[[Tensor], Tensor] = F.relu if relu else torch.nn.Identity()
    assert x.shape[1] == inp
    x1 = act(bn(ck, "primary_conv.1", conv(ck, "primary_conv.0", x, stride, kernel_size // 2), TORCH_EPS))
    x2 = bn(ck, "cheap_operation.1", conv(ck, "cheap_operation.0", x1, 1, dw_size // 2, oup), TORCH_EPS)
    if reparam_bn:
        x2 = x2 + bn(ck, "fusion_bn.0", x1, TORCH_EPS)
    if reparam_identity:
        x2 = x2 + x1
    return act(x2)


def repghost_bottleneck_reference(
    ck: Checkpoint, x: Tensor, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int, stride: int, has_se: bool
) -> Tensor:
    """RepGhostBottleneck (shortcut=True, reparam_bn): ghost2(se(dw(ghost1(x)))) + shortcut(x).
    dw: depthwise conv_dw + bn_dw (stride, pad (k - 1) // 2) only when stride > 1; se: x *
    hard_sigmoid(conv_expand(relu(conv_reduce(mean_hw(x))))); shortcut: x itself when in == out
    and stride 1, else depthwise kxk conv + BN, 1x1 conv + BN (`shortcut.0` ... `shortcut.3`)."""
    pad = (dw_kernel_size - 1) // 2
    y = repghost_module_reference(block_prefix(ck, "ghost1"), x, in_chs, mid_chs, relu=True)
    if stride > 1:
        y = bn(ck, "bn_dw", conv(ck, "conv_dw", y, stride, pad, mid_chs), TORCH_EPS)
    if has_se:
        s = conv(ck, "se.conv_expand", F.relu(conv(ck, "se.conv_reduce", y.mean((2, 3), keepdim=True))))
        y = y * F.relu6(s + 3.0) / 6.0
    y = repghost_module_reference(block_prefix(ck, "ghost2"), y, mid_chs, out_chs, relu=False)
    if in_chs == out_chs and stride == 1:
        return y + x
    r = bn(ck, "shortcut.1", conv(ck, "shortcut.0", x, stride, pad, in_chs), TORCH_EPS)
    return y + bn(ck, "shortcut.3", conv(ck, "shortcut.2", r), TORCH_EPS)


# ----------------------------------------------------------------------------- cases

Reference = Callable[..., Tensor]


def _official(cls: str, reference: Reference, **kwargs: Any) -> tuple[SpecLike, Reference, dict[str, Any]]:
    """A case: the registry's block for the official class and arguments, and the reference."""
    return official_block(cls, **kwargs), reference, kwargs


def _repvgg(**kwargs: Any) -> tuple[SpecLike, Reference, dict[str, Any]]:
    """A RepVGGBlock case: kernel_size 3 and padding 1 (the official asserts) and `kwargs`."""
    return _official("RepVGGBlock", repvgg_block_reference, kernel_size=3, padding=1, **kwargs)


def _plus(prefix: str, **kwargs: Any) -> tuple[SpecLike, Reference, dict[str, Any]]:
    """A case: the RepVGGplusBlock at `prefix` in the registry's RepVGGplus-L2pse (the library
    offers that class through the model), with the official arguments the model gives it."""
    blocks = dict(get_spec("RepVGGplus-L2pse").blocks())
    assert blocks[prefix].kind == "RepVGGplusBlock"
    return blocks[prefix], repvgg_block_reference, dict(kernel_size=3, padding=1, use_post_se=True, **kwargs)


def _bottleneck(
    in_chs: int, mid_chs: int, out_chs: int, k: int, stride: int, se_channels: int
) -> tuple[SpecLike, Reference, dict[str, Any]]:
    """A case: the library's RepGhostBottleneck spec and the reference's official arguments."""
    spec = RepGhostBottleneckSpec(in_chs, mid_chs, out_chs, k, stride, se_channels)
    return (
        spec,
        repghost_bottleneck_reference,
        dict(in_chs=in_chs, mid_chs=mid_chs, out_chs=out_chs, dw_kernel_size=k, stride=stride, has_se=se_channels > 0),
    )


CASES = {
    "RepVGGBlock-identity": _repvgg(in_channels=8, out_channels=8),
    "RepVGGBlock-s2-se": _repvgg(in_channels=8, out_channels=64, stride=2, use_se=True),
    "RepVGGBlock-g2-identity": _repvgg(in_channels=8, out_channels=8, groups=2),
    "RepVGGBlock-g4-s2-in!=out": _repvgg(in_channels=8, out_channels=16, stride=2, groups=4),
    "RepVGGBlock-se-identity-g2": _repvgg(in_channels=64, out_channels=64, groups=2, use_se=True),
    "RepVGGplusBlock-stem-s2": _plus("stage0", in_channels=3, out_channels=64, stride=2),
    "RepVGGplusBlock-identity": _plus("stage1.blocks.1", in_channels=160, out_channels=160),
    "RepConv-identity": _official("RepConv", repconv_reference, c1=8, c2=8),
    "RepConv-g2-s2": _official("RepConv", repconv_reference, c1=8, c2=16, s=2, g=2),
    "RepConv-g4-no-act": _official("RepConv", repconv_reference, c1=8, c2=8, g=4, act=False),
    "RepConv-relu-module": _official("RepConv", repconv_reference, c1=8, c2=12, p=1, act=torch.nn.ReLU()),
    "RepGhostModule-default": _official("RepGhostModule", repghost_module_reference, inp=8, oup=12),
    "RepGhostModule-identity-only": _official(
        "RepGhostModule", repghost_module_reference, inp=8, oup=8, reparam_bn=False, reparam_identity=True
    ),
    "RepGhostModule-bn-and-identity": _official(
        "RepGhostModule", repghost_module_reference, inp=6, oup=8, reparam_identity=True
    ),
    "RepGhostModule-k3-dw5-s2-linear": _official(
        "RepGhostModule", repghost_module_reference, inp=8, oup=12, kernel_size=3, dw_size=5, stride=2, relu=False
    ),
    "RepGhostModule-no-reparam": _official("RepGhostModule", repghost_module_reference, inp=8, oup=8, reparam_bn=False),
    "RepGhostBottleneck-identity-shortcut": _bottleneck(8, 16, 8, 3, 1, 0),
    "RepGhostBottleneck-conv-shortcut": _bottleneck(8, 16, 12, 3, 1, 0),
    "RepGhostBottleneck-s2-se-k5": _bottleneck(8, 16, 12, 5, 2, 4),
    "RepGhostBottleneck-se-identity-shortcut": _bottleneck(8, 24, 8, 3, 1, 8),
}


def _input(kwargs: dict[str, Any], seed: int = 1) -> Tensor:
    """A random input for the case's input channels; square (8 x 8) for RepVGG's SEBlock, whose
    pool is a global mean on square maps only (see test_repvgg_se_on_non_square_maps)."""
    channels = next(kwargs[k] for k in ("in_channels", "c1", "inp", "in_chs") if k in kwargs)
    square = kwargs.get("use_se") or kwargs.get("use_post_se")
    return random_input(channels, seed, (8, 8) if square else (9, 8))


@pytest.mark.parametrize("case", list(CASES))
def test_library_forms_match_the_reference(case: str) -> None:
    spec, reference, kwargs = CASES[case]
    ck = official_checkpoint(spec, seed=len(case))
    x = _input(kwargs)
    assert_forms_match(spec, ck, x, reference(ck, x, **kwargs), TRAIN_TOL, DEPLOY_TOL)


def test_repconv_in_a_yolov7_model_uses_eps_1e3() -> None:
    """repconv_spec's default is the BN eps a YOLOv7 Model sets (1e-3); the registry's RepConv
    keeps torch's 1e-5 (both checked against the reference with the matching eps)."""
    spec, x = repconv_spec(8, 8, groups=2), random_input(8)
    ck = official_checkpoint(spec, seed=3)
    assert_forms_match(spec, ck, x, repconv_reference(ck, x, 8, 8, g=2, eps=1e-3), TRAIN_TOL, DEPLOY_TOL)
    # read with 1e-5 instead, the reference moves by 8.9e-4 (measured): far above the tolerance
    err = rel_err(library_forms(spec, ck, x)[0], repconv_reference(ck, x, 8, 8, g=2, eps=TORCH_EPS))
    assert err > 100 * TRAIN_TOL, f"the eps 1e-5 reference is only {err:.3g} from the train form"


@pytest.mark.xfail(
    strict=True,
    reason="official SEBlock pools avg_pool2d(kernel=W): on an H x W map with W < H < 2W that is the "
    "mean of the top W rows only; the library's SE takes the mean over all H x W (same on square "
    "maps). Measured error 7.1e-3 on a 9 x 8 input.",
)
def test_repvgg_se_on_non_square_maps() -> None:
    spec, reference, kwargs = CASES["RepVGGBlock-se-identity-g2"]
    ck = official_checkpoint(spec, seed=4)
    x = random_input(64, size=(9, 8))
    assert rel_err(library_forms(spec, ck, x)[0], reference(ck, x, **kwargs)) <= TRAIN_TOL


# ----------------------------------------------------------------------------- mutations


_REPCONV_BNS = ("rbr_dense.1", "rbr_1x1.1", "rbr_identity")


def _se_after_act(spec: SpecLike) -> Block:
    """The block with its SE moved after the activation (RepVGGplus' order, not RepVGGBlock's)."""

    def fn(node: Node) -> Node:
        if isinstance(node, Block) and isinstance(node.body[-1], Act) and isinstance(node.body[-2], SE):
            return replace(node, body=(*node.body[:-2], node.body[-1], node.body[-2]))
        return node

    return mutate(spec, fn)


# case and mutation; the mutant's measured error against the reference in the comment
MUTANTS: dict[str, tuple[str, Callable[[SpecLike], Block]]] = {
    # 4.7e-1
    "RepVGG-dense-bn<->1x1-bn": ("RepVGGBlock-identity", lambda s: swap_names(s, "rbr_dense.bn", "rbr_1x1.bn")),
    # 3.1e-1
    "RepVGG-se-dense-bn<->1x1-bn": ("RepVGGBlock-s2-se", lambda s: swap_names(s, "rbr_dense.bn", "rbr_1x1.bn")),
    # 6.7e-1
    "RepVGG-se-after-relu": ("RepVGGBlock-se-identity-g2", _se_after_act),
    # 7.5e-1
    "RepConv-dense-bn<->1x1-bn": ("RepConv-g2-s2", lambda s: swap_names(s, "rbr_dense.1", "rbr_1x1.1")),
    # 6.1e-4
    "RepConv-eps-1e-3": ("RepConv-identity", lambda s: set_eps_all(s, _REPCONV_BNS, 1e-3)),
    # 5.7e-1
    "RepGhost-fusion-bn<->cheap-bn": (
        "RepGhostModule-default",
        lambda s: swap_names(s, "fusion_bn.0", "cheap_operation.1"),
    ),
    # 4.2e-1
    "RepGhost-identity-dropped": ("RepGhostModule-identity-only", lambda s: drop_branches(s, lambda b: b == ())),
    # 8.2e-1
    "RepGhost-identity-dropped-beside-bn": (
        "RepGhostModule-bn-and-identity",
        lambda s: drop_branches(s, lambda b: b == ()),
    ),
    # 6.0e-2
    "RepGhost-se-gate-sigmoid": (
        "RepGhostBottleneck-se-identity-shortcut",
        lambda s: mutate(s, lambda n: replace(n, gate="sigmoid") if isinstance(n, SE) else n),
    ),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_reference_rejects_a_mis_described_block(mutant: str) -> None:
    case, mutation = MUTANTS[mutant]
    spec, reference, kwargs = CASES[case]
    ck = official_checkpoint(spec, seed=len(case))
    x = _input(kwargs)
    assert_mutant_caught(mutation(spec), spec, ck, x, reference(ck, x, **kwargs), TRAIN_TOL)
