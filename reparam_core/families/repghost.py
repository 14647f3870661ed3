"""RepGhostNet as data: the module, bottleneck and model specs, their descriptions, and the
registry entries (`repghostnet_0_5x` ... `repghostnet_2_0x`).

A RepGhost module is a 1x1 `primary_conv` (conv `0`, BN `1`, ReLU) followed by the
re-parameterizable sum of the depthwise `cheap_operation` (conv `0` + BN `1`) and the BN
shortcut `fusion_bn.0`; its deploy form makes `cheap_operation` one depthwise conv. The
bottleneck (ghost1, depthwise stride conv, SE, ghost2, plus a shortcut) is not fusable as a
whole: its residual sum is a plain `Add`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from ..blocks.nodes import BN, SE, Act, Add, Block, Branch, Conv, Dropout, Flatten, GlobalPool, Linear, Model, Node, Rep
from .official_args import positive, require, train_form_only


@dataclass(frozen=True)
class RepGhostModuleSpec:
    """RepGhost module: primary 1x1 conv+BN(+ReLU), a depthwise `cheap_operation` conv+BN on its
    output, plus the re-parameterizable BN shortcut (`fusion_bn.0`, with `reparam_bn`) and a raw
    identity shortcut (with `reparam_identity`) added to it; ReLU if `relu`. Deploy form:
    `cheap_operation` is one depthwise conv with bias (the shortcuts fused in)."""

    in_channels: int
    out_channels: int
    kernel_size: int = 1
    dw_size: int = 3
    stride: int = 1
    relu: bool = True
    reparam_bn: bool = True
    eps: float = 1e-5
    reparam_identity: bool = False

    kind = "RepGhostModule"

    def describe(self) -> Block:
        c, dw = self.out_channels, self.dw_size
        act = Act("relu" if self.relu else "identity")
        branches: list[Branch] = [
            (Conv("cheap_operation.0", c, c, dw, padding=dw // 2, groups=c), BN("cheap_operation.1", c, self.eps))
        ]
        if self.reparam_bn:
            branches.append((BN("fusion_bn.0", c, self.eps),))
        if self.reparam_identity:
            branches.append(())
        return Block(
            "",
            self.kind,
            (
                Conv(
                    "primary_conv.0",
                    self.in_channels,
                    c,
                    self.kernel_size,
                    stride=self.stride,
                    padding=self.kernel_size // 2,
                ),
                BN("primary_conv.1", c, self.eps),
                act,
                Rep(tuple(branches), Conv("cheap_operation", c, c, dw, padding=dw // 2, groups=c)),
                act,
            ),
        )


@dataclass(frozen=True)
class RepGhostBottleneckSpec:
    in_channels: int
    mid_channels: int
    out_channels: int
    dw_kernel_size: int = 3
    stride: int = 1
    se_channels: int = 0  # 0: no SqueezeExcite
    eps: float = 1e-5

    kind = "RepGhostBottleneck"

    @property
    def ghost1(self) -> RepGhostModuleSpec:
        return RepGhostModuleSpec(self.in_channels, self.mid_channels, relu=True, eps=self.eps)

    @property
    def ghost2(self) -> RepGhostModuleSpec:
        return RepGhostModuleSpec(self.mid_channels, self.out_channels, relu=False, eps=self.eps)

    @property
    def has_conv_shortcut(self) -> bool:
        return not (self.in_channels == self.out_channels and self.stride == 1)

    def describe(self) -> Block:
        k, mid, cin, eps = self.dw_kernel_size, self.mid_channels, self.in_channels, self.eps
        pad = (k - 1) // 2
        main: list[Node] = [replace(self.ghost1.describe(), name="ghost1")]
        if self.stride > 1:
            main += [Conv("conv_dw", mid, mid, k, stride=self.stride, padding=pad, groups=mid), BN("bn_dw", mid, eps)]
        if self.se_channels:
            main.append(SE("se", mid, self.se_channels, "conv_reduce", "conv_expand", "hard_sigmoid"))
        main.append(replace(self.ghost2.describe(), name="ghost2"))
        shortcut: tuple[Node, ...] = ()
        if self.has_conv_shortcut:
            shortcut = (
                Conv("shortcut.0", cin, cin, k, stride=self.stride, padding=pad, groups=cin),
                BN("shortcut.1", cin, eps),
                Conv("shortcut.2", cin, self.out_channels, 1),
                BN("shortcut.3", self.out_channels, eps),
            )
        return Block("", self.kind, (Add((tuple(main), shortcut)),))


@dataclass(frozen=True)
class RepGhostNetSpec:
    """RepGhostNet: conv_stem+bn1+ReLU, `blocks.i.j` bottlenecks, a last 1x1 ConvBnAct stage,
    global pool, `conv_head` (1x1 with bias) + ReLU, dropout, `classifier`."""

    name: str
    width: float
    stem_channels: int
    stages: tuple[tuple[RepGhostBottleneckSpec, ...], ...]
    last_channels: int
    head_channels: int = 1280
    num_classes: int = 1000
    dropout: float = 0.2
    eps: float = 1e-5
    family: Literal["repghostnet"] = "repghostnet"

    @property
    def last_in_channels(self) -> int:
        return self.stages[-1][-1].out_channels

    @property
    def last_prefix(self) -> str:
        return f"blocks.{len(self.stages)}.0"

    def blocks(self) -> list[tuple[str, RepGhostBottleneckSpec]]:
        """Every bottleneck with its module path, in forward order."""
        return [(f"blocks.{i}.{j}", b) for i, stage in enumerate(self.stages) for j, b in enumerate(stage)]

    def describe(self) -> Model:
        eps, last = self.eps, self.last_prefix
        body: list[Node] = [
            Conv("conv_stem", 3, self.stem_channels, 3, stride=2, padding=1),
            BN("bn1", self.stem_channels, eps),
            Act("relu"),
        ]
        body += [replace(b.describe(), name=prefix) for prefix, b in self.blocks()]
        body += [
            Conv(f"{last}.conv", self.last_in_channels, self.last_channels, 1),
            BN(f"{last}.bn1", self.last_channels, eps),
            Act("relu"),
            GlobalPool(),
            Conv("conv_head", self.last_channels, self.head_channels, 1, bias=True),
            Act("relu"),
            Flatten(),
            Dropout(self.dropout),
            Linear("classifier", self.head_channels, self.num_classes),
        ]
        return Model(self.name, "RepGhostNet", tuple(body))


# (dw kernel, expansion, out channels, SE ratio, stride) per bottleneck, grouped into stages.
_REPGHOST_CFG: tuple[tuple[tuple[int, int, int, float, int], ...], ...] = (
    ((3, 8, 16, 0, 1),),
    ((3, 24, 24, 0, 2),),
    ((3, 36, 24, 0, 1),),
    ((5, 36, 40, 0.25, 2),),
    ((5, 60, 40, 0.25, 1),),
    ((3, 120, 80, 0, 2),),
    ((3, 100, 80, 0, 1), (3, 120, 80, 0, 1), (3, 120, 80, 0, 1), (3, 240, 112, 0.25, 1), (3, 336, 112, 0.25, 1)),
    ((5, 336, 160, 0.25, 2),),
    ((5, 480, 160, 0, 1), (5, 480, 160, 0.25, 1), (5, 480, 160, 0, 1), (5, 480, 160, 0.25, 1)),
)
_REPGHOST_WIDTHS = {
    "0_5x": 0.5,
    "0_58x": 0.58,
    "0_8x": 0.8,
    "1_0x": 1.0,
    "1_11x": 1.11,
    "1_3x": 1.3,
    "1_5x": 1.5,
    "2_0x": 2.0,
}


def make_divisible(v: float, divisor: int = 4) -> int:
    """Round to a multiple of `divisor`, never more than 10% below v (MobileNet's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def repghostnet_spec(name: str, width: float, num_classes: int = 1000) -> RepGhostNetSpec:
    stem = make_divisible(16 * width, 4)
    cin = stem
    stages = []
    for cfg in _REPGHOST_CFG:
        blocks = []
        for k, exp, c, se_ratio, s in cfg:
            out = make_divisible(c * width, 4)
            mid = make_divisible(exp * width, 4)
            se_ch = make_divisible(mid * se_ratio, 4) if se_ratio > 0 else 0
            blocks.append(RepGhostBottleneckSpec(cin, mid, out, k, s, se_ch))
            cin = out
        stages.append(tuple(blocks))
    last_exp = _REPGHOST_CFG[-1][-1][1]
    return RepGhostNetSpec(
        name, width, stem, tuple(stages), make_divisible(last_exp * width * 2, 4), num_classes=num_classes
    )


def _entry(name: str, width: float) -> Callable[[int], RepGhostNetSpec]:
    return lambda num_classes: repghostnet_spec(name, width, num_classes)


MODELS: dict[str, Callable[[int], RepGhostNetSpec]] = {
    f"repghostnet_{s}": _entry(f"repghostnet_{s}", w) for s, w in _REPGHOST_WIDTHS.items()
}

# timm's names: `repghostnet_050` ... `repghostnet_200` (width x 100, three digits).
ALIASES: dict[str, str] = {
    f"repghostnet_{round(w * 100):03d}": f"repghostnet_{tag}" for tag, w in _REPGHOST_WIDTHS.items()
}

# Other implementations' names (reparam_core.weights.keymaps). Checked against the sources (facts
# only): timm `repghost.py` (`repghostnet_050` ... `repghostnet_200`, its weights converted from the
# official release with no key filter) keeps every official module name: `conv_stem`, `bn1`,
# `blocks.{i}.{j}` with `ghost1`/`ghost2` (`primary_conv.0`/`.1`, `cheap_operation.0`/`.1`,
# `fusion_bn.0`; deploy form: `cheap_operation` one conv with bias), `conv_dw`, `bn_dw`, SE
# `se.conv_reduce`/`se.conv_expand`, `shortcut.{0..3}`, the last stage's ConvBnAct as
# `blocks.9.0.conv`/`.bn1`, `conv_head`, `classifier`. So its scheme is the identity. mmpretrain and
# basecls have no RepGhostNet, so no scheme of theirs.
KEYMAPS: dict[str, list[tuple[str, str]]] = {"timm": []}


def official_repghost_module(
    inp: int,
    oup: int,
    kernel_size: int = 1,
    dw_size: int = 3,
    stride: int = 1,
    relu: bool = True,
    deploy: bool = False,
    reparam_bn: bool = True,
    reparam_identity: bool = False,
) -> RepGhostModuleSpec:
    """ChengpengChen/RepGhost `RepGhostModule(...)`: primary conv `primary_conv.0`/`.1` (padding
    kernel_size // 2), depthwise `cheap_operation.0`/`.1` (padding dw_size // 2), shortcuts
    `fusion_bn.0` (reparam_bn) and a raw identity (reparam_identity). dw_size must be odd (an
    even one changes the cheap branch's output size: the sum fails in the official code)."""
    cls = "RepGhostModule"
    positive(cls, inp=inp, oup=oup, kernel_size=kernel_size, dw_size=dw_size, stride=stride)
    require(cls, dw_size % 2 == 1, "dw_size", dw_size, "must be odd (a 'same' depthwise conv)")
    train_form_only(cls, deploy)
    return RepGhostModuleSpec(
        inp, oup, kernel_size, dw_size, stride, bool(relu), bool(reparam_bn), reparam_identity=bool(reparam_identity)
    )


OFFICIAL = {"RepGhostModule": official_repghost_module}

__all__ = [
    "OFFICIAL",
    "official_repghost_module",
    "RepGhostModuleSpec",
    "RepGhostBottleneckSpec",
    "RepGhostNetSpec",
    "repghostnet_spec",
    "make_divisible",
    "MODELS",
    "ALIASES",
    "KEYMAPS",
]
