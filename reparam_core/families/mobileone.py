"""MobileOne (apple/ml-mobileone) as data: the block and model specs, their descriptions, the
registry entries `MobileOne-S0` ... `MobileOne-S4`, timm's and mmpretrain's names as key maps,
and the official `MobileOneBlock` constructor.

A MobileOne block sums `num_conv_branches` kxk conv+BN branches (`rbr_conv.{i}.conv`/`.bn`),
a 1x1 conv+BN "scale" branch (`rbr_scale`, only when kernel_size > 1) and a BN identity branch
(`rbr_skip`, only when in == out channels and stride 1); then SE (`se.reduce`/`se.expand`,
hidden = int(C / 16), ReLU and sigmoid) when asked, then ReLU. Its deploy form is one kxk conv
`reparam_conv` with bias. Every branch shares the block's stride and groups.

The model: stem block `stage0` (3x3, stride 2, one conv branch in every variant), stages
`stage1..stage4` of 2, 8, 10, 1 pairs of blocks, a depthwise 3x3 block (`stageN.{2j}`, stride 2
for the first pair) then a pointwise 1x1 block (`stageN.{2j+1}`), global average pool `gap`,
`linear`. S4 puts SE in both blocks of the last 5 pairs of stage3 and of the pair of stage4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..blocks.nodes import (
    BN,
    SE,
    Act,
    ActFn,
    Block,
    Branch,
    Conv,
    Flatten,
    Geometry,
    GlobalPool,
    Linear,
    Model,
    Node,
    Rep,
    to_deploy,
)
from ..errors import SpecError
from .official_args import bools, ints

SE_RATIO = 0.0625  # the official SEBlock's rd_ratio: hidden = int(channels * 0.0625)


@dataclass(frozen=True)
class MobileOneBlockSpec:
    """MobileOneBlock: act(SE?(sum of rbr_skip, rbr_scale and the rbr_conv branches)).

    `padding` -1 means kernel_size // 2 (what every block of the official models uses). `act`
    is ReLU in apple/ml-mobileone, GELU (or none, `identity`) in apple/ml-fastvit's copy of the
    class, which also has `use_scale_branch` and allows num_conv_branches=0 (RepMixer's `norm`:
    the skip branch only)."""

    in_channels: int
    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = -1
    groups: int = 1
    use_se: bool = False
    num_conv_branches: int = 1
    eps: float = 1e-5
    act: ActFn = "relu"
    use_scale_branch: bool = True

    kind = "MobileOneBlock"

    def __post_init__(self) -> None:
        if self.padding < 0:
            object.__setattr__(self, "padding", self.kernel_size // 2)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "groups"):
            if getattr(self, name) < 1:
                raise SpecError(f"MobileOneBlock {name} must be >= 1, got {getattr(self, name)}")
        if self.num_conv_branches < 0 or not (self.num_conv_branches or self.has_scale or self.has_skip):
            raise SpecError(
                f"MobileOneBlock needs a branch: num_conv_branches must be >= 0, and >= 1 without "
                f"the scale and skip branches, got {self.num_conv_branches}"
            )
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise SpecError(
                f"MobileOneBlock channels {self.in_channels} -> {self.out_channels} "
                f"are not divisible by groups={self.groups}"
            )
        if self.kernel_size > 1 and self.kernel_size % 2 == 0:
            raise SpecError(
                f"MobileOneBlock kernel_size must be 1 or odd (the 1x1 scale branch "
                f"is centred in it), got {self.kernel_size}"
            )
        if (self.has_scale or self.has_skip) and self.padding != self.kernel_size // 2:
            raise SpecError(
                f"MobileOneBlock padding must be kernel_size // 2 = "
                f"{self.kernel_size // 2} for its branches to line up, got "
                f"{self.padding}"
            )
        if self.use_se and self.se_channels < 1:
            raise SpecError(
                f"MobileOneBlock use_se needs out_channels >= 16 (SE hidden int({self.out_channels} * {SE_RATIO}) = 0)"
            )

    @property
    def has_skip(self) -> bool:
        return self.in_channels == self.out_channels and self.stride == 1

    @property
    def has_scale(self) -> bool:
        return self.kernel_size > 1 and self.use_scale_branch

    @property
    def se_channels(self) -> int:
        return int(self.out_channels * SE_RATIO)

    def describe(self) -> Block:
        cin, cout, k, eps = self.in_channels, self.out_channels, self.kernel_size, self.eps
        geo: Geometry = {"stride": self.stride, "groups": self.groups}
        branches: list[Branch] = []
        if self.has_skip:
            branches.append((BN("rbr_skip", cout, eps),))
        branches += [
            (Conv(f"rbr_conv.{i}.conv", cin, cout, k, padding=self.padding, **geo), BN(f"rbr_conv.{i}.bn", cout, eps))
            for i in range(self.num_conv_branches)
        ]
        if self.has_scale:
            branches.append((Conv("rbr_scale.conv", cin, cout, 1, **geo), BN("rbr_scale.bn", cout, eps)))
        body: list[Node] = [Rep(tuple(branches), Conv("reparam_conv", cin, cout, k, padding=self.padding, **geo))]
        if self.use_se:
            body.append(SE("se", cout, self.se_channels, "reduce", "expand"))
        body.append(Act(self.act))
        return Block("", self.kind, tuple(body))


@dataclass(frozen=True)
class MobileOneSpec:
    """MobileOne: `stage0`, `stage1..stage4` (Sequentials of blocks), global pool, `linear`."""

    name: str
    stem: MobileOneBlockSpec
    stages: tuple[tuple[MobileOneBlockSpec, ...], ...]
    num_classes: int = 1000
    family: Literal["mobileone"] = "mobileone"

    @property
    def num_features(self) -> int:
        return self.stages[-1][-1].out_channels

    def blocks(self) -> list[tuple[str, MobileOneBlockSpec]]:
        """Every block with its module path, in forward order."""
        return [("stage0", self.stem)] + [
            (f"stage{i + 1}.{j}", b) for i, stage in enumerate(self.stages) for j, b in enumerate(stage)
        ]

    def describe(self) -> Model:
        body: list[Node] = [replace(b.describe(), name=prefix) for prefix, b in self.blocks()]
        body += [GlobalPool(), Flatten(), Linear("linear", self.num_features, self.num_classes)]
        return Model(self.name, "MobileOne", tuple(body))


DEPTHS = (2, 8, 10, 1)  # block pairs per stage, every variant
BASE_WIDTHS = (64, 128, 256, 512)


def mobileone_spec(
    name: str,
    widths: tuple[float, float, float, float],
    num_conv_branches: int = 1,
    use_se: bool = False,
    num_classes: int = 1000,
) -> MobileOneSpec:
    """A MobileOne spec as the official code builds it: stem min(64, int(64 w0)) channels;
    stage i of int(base_i w_i) channels; SE (when `use_se`) in the last half (rounded down) of
    stage3's pairs and in every pair of stage4."""
    cin = min(64, int(BASE_WIDTHS[0] * widths[0]))
    stem = MobileOneBlockSpec(3, cin, 3, stride=2)
    stages = []
    for i, (n, base, w) in enumerate(zip(DEPTHS, BASE_WIDTHS, widths)):
        planes = int(base * w)
        num_se = (n // 2 if i == 2 else n if i == 3 else 0) if use_se else 0
        blocks: list[MobileOneBlockSpec] = []
        for j in range(n):
            se = j >= n - num_se
            blocks += [
                MobileOneBlockSpec(
                    cin, cin, 3, 2 if j == 0 else 1, groups=cin, use_se=se, num_conv_branches=num_conv_branches
                ),
                MobileOneBlockSpec(cin, planes, 1, use_se=se, num_conv_branches=num_conv_branches),
            ]
            cin = planes
        stages.append(tuple(blocks))
    return MobileOneSpec(name, stem, tuple(stages), num_classes)


_MOBILEONE: dict[str, dict[str, Any]] = {
    "MobileOne-S0": dict(widths=(0.75, 1.0, 1.0, 2.0), num_conv_branches=4),
    "MobileOne-S1": dict(widths=(1.5, 1.5, 2.0, 2.5)),
    "MobileOne-S2": dict(widths=(1.5, 2.0, 2.5, 4.0)),
    "MobileOne-S3": dict(widths=(2.0, 2.5, 3.0, 4.0)),
    "MobileOne-S4": dict(widths=(3.0, 3.5, 3.5, 4.0), use_se=True),
}


def _entry(name: str, kw: dict[str, Any]) -> Callable[[int], MobileOneSpec]:
    return lambda num_classes: mobileone_spec(name, num_classes=num_classes, **kw)


MODELS: dict[str, Callable[[int], MobileOneSpec]] = {n: _entry(n, kw) for n, kw in _MOBILEONE.items()}

# timm's names (`mobileone_s0` ... `mobileone_s4`).
ALIASES: dict[str, str] = {n.replace("MobileOne-", "mobileone_").lower(): n for n in _MOBILEONE}

# Other implementations' names (reparam_core.weights.keymaps: (foreign, canonical) templates, both ways).
# Checked against the sources (facts only):
# - timm `byobnet.py` (`mobileone_s0` ... `mobileone_s4`): the stem MobileOneBlock is `stem`,
#   stages `stages.{0..3}.{j}` with the same interleaved depthwise/pointwise blocks, so the map is
#   1:1. Inside a block: `conv_kxk.{i}.conv`/`.bn`, `conv_scale.conv`/`.bn`, `identity` (a
#   BatchNormAct2d: the same fields), `reparam_conv`, SE `attn.fc1`/`attn.fc2`; head `head.fc`.
# - mmpretrain `MobileOne` backbone in an ImageClassifier: `backbone.stage0`,
#   `backbone.stage{1..4}.{j}`; inside a block `branch_conv_list.{i}.conv`/`.norm`,
#   `branch_scale.conv`/`.norm`, `branch_norm`, `branch_reparam`, SE `se.conv1.conv`/
#   `se.conv2.conv`; head `head.fc` (LinearClsHead).
# - basecls has no MobileOne, so no scheme of its own here.
KEYMAPS: dict[str, list[tuple[str, str]]] = {
    "mmpretrain": [
        ("^backbone.stage{i}.", "^stage{i}."),
        ("^head.fc.", "^linear."),
        ("branch_conv_list.{i}.conv.", "rbr_conv.{i}.conv."),
        ("branch_conv_list.{i}.norm.", "rbr_conv.{i}.bn."),
        ("branch_scale.conv.", "rbr_scale.conv."),
        ("branch_scale.norm.", "rbr_scale.bn."),
        ("branch_norm.", "rbr_skip."),
        ("branch_reparam.", "reparam_conv."),
        ("se.conv1.conv.", "se.reduce."),
        ("se.conv2.conv.", "se.expand."),
    ],
    "timm": [
        ("^stem.", "^stage0."),
        ("^stages.{i}.{j}.", "^stage{i+1}.{j}."),
        ("^head.fc.", "^linear."),
        ("conv_kxk.{i}.", "rbr_conv.{i}."),
        ("conv_scale.", "rbr_scale."),
        ("identity.", "rbr_skip."),
        ("attn.fc1.", "se.reduce."),
        ("attn.fc2.", "se.expand."),
    ],
}


def official_mobileone_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    inference_mode: bool = False,
    use_se: bool = False,
    num_conv_branches: int = 1,
) -> MobileOneBlockSpec | Block:
    """apple/ml-mobileone `MobileOneBlock(...)`: its spec, or with `inference_mode=True` its
    deploy-form description (the official class then holds `reparam_conv` only).

    SpecError for what the official class cannot build consistently: dilation other than 1
    (its train-form branches ignore it), misaligned padding, an even kernel, SE on fewer than
    16 channels, bad counts."""
    bools("MobileOneBlock", inference_mode=inference_mode, use_se=use_se)
    ints(
        "MobileOneBlock",
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        num_conv_branches=num_conv_branches,
    )
    if dilation != 1:
        raise SpecError(
            f"MobileOneBlock dilation must be 1: the official train-form branches "
            f"ignore it, so the two forms would differ (got {dilation})"
        )
    if padding < 0:
        raise SpecError(f"MobileOneBlock padding must be >= 0, got {padding}")
    if num_conv_branches < 1:
        raise SpecError(f"MobileOneBlock num_conv_branches must be >= 1, got {num_conv_branches}")
    spec = MobileOneBlockSpec(
        in_channels, out_channels, kernel_size, stride, padding, groups, use_se, num_conv_branches
    )
    if not inference_mode:
        return spec
    return to_deploy(spec.describe())  # type: ignore[return-value]


OFFICIAL = {"MobileOneBlock": official_mobileone_block}

__all__ = [
    "MobileOneBlockSpec",
    "MobileOneSpec",
    "mobileone_spec",
    "MODELS",
    "ALIASES",
    "KEYMAPS",
    "OFFICIAL",
    "official_mobileone_block",
    "SE_RATIO",
]
