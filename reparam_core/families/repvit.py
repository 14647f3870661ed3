"""RepViT (THU-MIG/RepViT) as data: the block and model specs, their descriptions, the registry
entries `RepViT-M0.9` ... `RepViT-M2.3` and the legacy `RepViT-M1`, `RepViT-M2`, `RepViT-M3`,
timm's names as a key map, and the official `RepVGGDW` and `RepViTBlock` constructors.

The official model (`model/repvit.py`) is a flat `features` ModuleList: `features.0` the stem
(`Sequential(Conv2d_BN 3x3 s2, GELU, Conv2d_BN 3x3 s2)`, C/2 then C channels), then one
`RepViTBlock` per row of the configuration. A `Conv2d_BN` holds `c` (conv, no bias) and `bn`.
A stride-1 block: `token_mixer` = Sequential(`RepVGGDW` at `token_mixer.0`, `SqueezeExcite` or
Identity at `token_mixer.1`); `channel_mixer` = `Residual` whose `m` is Sequential(Conv2d_BN
1x1 C -> 2C at `m.0`, GELU, Conv2d_BN 1x1 2C -> C at `m.2`). A stride-2 block: `token_mixer` =
Sequential(Conv2d_BN dw kxk stride 2 at `token_mixer.0`, SE or Identity, Conv2d_BN 1x1
in -> out at `token_mixer.2`), then the same channel mixer on the output channels.

`RepVGGDW`: bn(conv(x) + conv1(x) + x), `conv` a Conv2d_BN dw 3x3, `conv1` a plain dw 1x1 conv
with bias, `bn` after the sum. The legacy version (the official first release: M1, M2, M3) has
`conv1` a Conv2d_BN dw 1x1 and no BN after the sum. SE is timm's `SqueezeExcite(C, 0.25)`:
hidden make_divisible(C / 4, 8) (rounded to the nearest multiple of 8, never below 8), 1x1
convs `fc1`, `fc2` with bias, ReLU, sigmoid. Head: global average pool, flatten, `Classfier`
at `classifier` with two `BN_Linear` heads (`classifier.classifier`, `classifier.classifier_dist`,
each BatchNorm1d `bn` then Linear `l`) averaged in inference.

The official deploy form (`utils.replace_batchnorm`) replaces every module that has `fuse`:
each Conv2d_BN by a conv with bias at its own path, each RepVGGDW by a dw 3x3 conv at its own
path, the Classfier by one Linear at `classifier` (the two heads averaged). Every one of those
is a `Rep` here (a Conv2d_BN a single-branch one), so the deploy keys are the official ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from ..blocks.nodes import (
    BN,
    SE,
    Act,
    Add,
    Block,
    Branch,
    Conv,
    Flatten,
    GlobalPool,
    Linear,
    Model,
    Node,
    Rep,
    join_key,
)
from ..errors import SpecError

SE_RATIO = 0.25  # the official SqueezeExcite(C, 0.25)
SE_DIVISOR = 8  # timm SqueezeExcite's rd_divisor


def se_channels(channels: int) -> int:
    """timm SqueezeExcite's hidden width for rd_ratio 0.25: max(8, 8 floor((C / 4 + 4) / 8)),
    the multiple of 8 nearest C / 4 (its make_divisible with round_limit 0)."""
    return max(SE_DIVISOR, int(channels * SE_RATIO + SE_DIVISOR / 2) // SE_DIVISOR * SE_DIVISOR)


def conv_bn(
    name: str, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, eps: float = 1e-5
) -> Rep:
    """An official `Conv2d_BN` at `name` (conv `name.c`, no bias, padding (k - 1) / 2; BN
    `name.bn`) as a single-branch Rep whose deploy form is the conv with bias at `name` (what
    its `fuse` puts in its place)."""
    pad = (kernel - 1) // 2
    conv = Conv(f"{name}.c", cin, cout, kernel, stride, pad, groups=groups)
    return Rep(((conv, BN(f"{name}.bn", cout, eps)),), Conv(name, cin, cout, kernel, stride, pad, groups=groups))


def repvgg_dw(name: str, channels: int, legacy: bool = False, eps: float = 1e-5) -> Rep:
    """The official `RepVGGDW(ed)` at `name`: bn(conv(x) + conv1(x) + x) with conv a dw 3x3
    Conv2d_BN, conv1 a dw 1x1 conv with bias, bn after the sum; legacy: conv1 a dw 1x1 Conv2d_BN
    and no bn. Deploy: the dw 3x3 conv with bias at `name`."""
    c = channels
    dw3 = (Conv(join_key(name, "conv.c"), c, c, 3, padding=1, groups=c), BN(join_key(name, "conv.bn"), c, eps))
    dw1: Branch = (
        (Conv(join_key(name, "conv1.c"), c, c, 1, groups=c), BN(join_key(name, "conv1.bn"), c, eps))
        if legacy
        else (Conv(join_key(name, "conv1"), c, c, 1, groups=c, bias=True),)
    )
    fused = Conv(name, c, c, 3, padding=1, groups=c)
    return Rep((dw3, dw1, ()), fused, bn=None if legacy else BN(join_key(name, "bn"), c, eps))


@dataclass(frozen=True)
class RepViTBlockSpec:
    """The official `RepViTBlock(inp, hidden_dim, oup, kernel_size, stride, use_se, use_hs)`:
    channel_mixer(token_mixer(x)), the channel mixer x + m(x) (see the module docstring).

    A stride-1 block needs in == out channels and mixes tokens with a RepVGGDW, whose kernel is
    3x3 whatever `kernel_size` is (as in the official class); a stride-2 block uses `kernel_size`
    for its dw conv. `hidden_channels` (the official hidden_dim, 2 x in) is the stride-1 channel
    mixer's width; a stride-2 block's is 2 x out. `use_hs` selects nothing (GELU either way)."""

    in_channels: int
    hidden_channels: int
    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    use_se: bool = False
    legacy: bool = False
    eps: float = 1e-5

    kind = "RepViTBlock"

    def __post_init__(self) -> None:
        for name in ("in_channels", "hidden_channels", "out_channels", "kernel_size"):
            if getattr(self, name) < 1:
                raise SpecError(f"RepViTBlock {name} must be >= 1, got {getattr(self, name)}")
        if self.stride not in (1, 2):
            raise SpecError(f"RepViTBlock stride must be 1 or 2, got {self.stride}")
        if self.hidden_channels != 2 * self.in_channels:
            raise SpecError(
                f"RepViTBlock hidden_dim must be 2 * inp = {2 * self.in_channels}, got {self.hidden_channels}"
            )
        if self.stride == 1 and self.in_channels != self.out_channels:
            raise SpecError(
                f"RepViTBlock with stride 1 needs inp == oup (its token mixer keeps the channels), "
                f"got {self.in_channels} -> {self.out_channels}"
            )
        if self.stride == 2 and self.kernel_size % 2 == 0:
            raise SpecError(f"RepViTBlock kernel_size must be odd, got {self.kernel_size}")

    def describe(self) -> Block:
        cin, cout, eps = self.in_channels, self.out_channels, self.eps
        body: list[Node] = []
        if self.stride == 1:
            body.append(repvgg_dw("token_mixer.0", cin, self.legacy, eps))
        else:
            body.append(conv_bn("token_mixer.0", cin, cin, self.kernel_size, 2, groups=cin, eps=eps))
        if self.use_se:
            body.append(SE("token_mixer.1", cin, se_channels(cin), "fc1", "fc2"))
        if self.stride == 2:
            body.append(conv_bn("token_mixer.2", cin, cout, eps=eps))
        hidden = self.hidden_channels if self.stride == 1 else 2 * cout
        mlp = (
            conv_bn("channel_mixer.m.0", cout, hidden, eps=eps),
            Act("gelu"),
            conv_bn("channel_mixer.m.2", hidden, cout, eps=eps),
        )
        body.append(Add(((), mlp)))
        return Block("", self.kind, tuple(body))


Cfg = tuple[int, int, int, int, int, int]  # an official configuration row: k, t, c, SE, HS, s


@dataclass(frozen=True)
class RepViTSpec:
    """RepViT: stem `features.0`, blocks `features.1...`, global pool, `classifier`.

    Given as timm gives it: per stage the width and the number of blocks after its downsampling.
    Stage 0 is `depths[0]` stride-1 blocks, SE in every other one from the first; every later
    stage is a stride-1 block on the previous width (no SE), a stride-2 block to the new width
    (no SE), then `depths[i]` stride-1 blocks as in stage 0. `cfgs()` is the official
    configuration list this gives."""

    name: str
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    legacy: bool = False
    distillation: bool = True
    num_classes: int = 1000
    kernel_size: int = 3
    family: Literal["repvit"] = "repvit"

    def __post_init__(self) -> None:
        if not self.widths or len(self.widths) != len(self.depths):
            raise SpecError(f"RepViT needs one depth per stage width, got {self.widths} and {self.depths}")
        if min(self.widths) < 2 or self.widths[0] % 2 or min(self.depths) < 0 or self.num_classes < 1:
            raise SpecError(
                f"RepViT widths must be >= 2 (the first even), depths >= 0, num_classes >= 1, "
                f"got {self.widths}, {self.depths}, {self.num_classes}"
            )

    @property
    def num_features(self) -> int:
        return self.widths[-1]

    def cfgs(self) -> tuple[Cfg, ...]:
        """The official configuration rows (k, t, c, use_se, use_hs, s); use_hs as in the
        official lists (0 in the first two stages, 1 after), though it selects nothing."""
        k = self.kernel_size
        rows: list[Cfg] = []
        for i, (c, depth) in enumerate(zip(self.widths, self.depths)):
            hs = int(i >= 2)
            if i > 0:
                prev_hs = int(i - 1 >= 2)
                rows += [(k, 2, self.widths[i - 1], 0, prev_hs, 1), (k, 2, c, 0, hs, 2)]
            rows += [(k, 2, c, int(j % 2 == 0), hs, 1) for j in range(depth)]
        return tuple(rows)

    def blocks(self) -> list[tuple[str, RepViTBlockSpec]]:
        """Every RepViTBlock with its module path (`features.1` ...), in forward order."""
        out: list[tuple[str, RepViTBlockSpec]] = []
        cin = self.widths[0]
        for i, (k, t, c, se, _, s) in enumerate(self.cfgs(), 1):
            out.append((f"features.{i}", RepViTBlockSpec(cin, cin * t, c, k, s, bool(se), self.legacy)))
            cin = c
        return out

    def describe(self) -> Model:
        c0, n = self.widths[0], self.num_features
        stem = (conv_bn("0", 3, c0 // 2, 3, 2), Act("gelu"), conv_bn("2", c0 // 2, c0, 3, 2))
        body: list[Node] = [Block("features.0", "Sequential", stem)]
        body += [replace(b.describe(), name=path) for path, b in self.blocks()]
        heads = ("classifier.classifier", "classifier.classifier_dist")[: 2 if self.distillation else 1]
        branches = tuple((BN(f"{h}.bn", n, dims=1), Linear(f"{h}.l", n, self.num_classes)) for h in heads)
        coefficients = tuple(1 / len(heads) for _ in heads) if self.distillation else None
        head = Rep(branches, Linear("classifier", n, self.num_classes), coefficients=coefficients)
        body += [GlobalPool(), Flatten(), head]
        return Model(self.name, "RepViT", tuple(body))

    def timm_rules(self) -> list[tuple[str, str]]:
        """timm's names (`repvit.py`: stages of a downsample and blocks) for this model's flat
        `features` indices, as (timm, official) templates: stage 0's blocks are features 1..;
        stage i's `downsample.pre_block` is the stride-1 block before its stride-2 block, whose
        dw conv, SE-free 1x1 and channel mixer are timm's `spatial_downsample`,
        `channel_downsample` and `ffn`; its blocks follow."""
        rules: list[tuple[str, str]] = [("^stages.0.blocks.{j}.", "^features.{j+1}.")]
        index = 1 + self.depths[0]
        for i, depth in enumerate(self.depths[1:], 1):
            down, ds = f"^stages.{i}.downsample.", f"^features.{index + 1}."
            rules += [
                (f"{down}pre_block.", f"^features.{index}."),
                (f"{down}spatial_downsample.", f"{ds}token_mixer.0."),
                (f"{down}channel_downsample.", f"{ds}token_mixer.2."),
                (f"{down}ffn.conv1.", f"{ds}channel_mixer.m.0."),
                (f"{down}ffn.conv2.", f"{ds}channel_mixer.m.2."),
                (f"^stages.{i}.blocks.{{j}}.", f"^features.{{j+{index + 2}}}."),
            ]
            index += 2 + depth
        return [*_TIMM_INNER, *rules]


# The renames that do not depend on the depths, applied before the index renames timm -> official
# (after them back): the stem's two ConvNorms; inside a block, timm holds the RepVggDw as
# `token_mixer` (not in a Sequential), SE as `se`, the channel mixer as `channel_mixer.conv1` /
# `.conv2` (RepVitMlp, no Residual wrapper); the head `head` (`head`, `head_dist` inside).
_TIMM_INNER: list[tuple[str, str]] = [
    ("^stem.conv1.", "^features.0.0."),
    ("^stem.conv2.", "^features.0.2."),
    ("token_mixer.", "token_mixer.0."),
    ("se.", "token_mixer.1."),
    ("channel_mixer.conv1.", "channel_mixer.m.0."),
    ("channel_mixer.conv2.", "channel_mixer.m.2."),
    ("^head.", "^classifier."),
    ("^classifier.head.", "^classifier.classifier."),
    ("^classifier.head_dist.", "^classifier.classifier_dist."),
]

_WIDTHS_S = (48, 96, 192, 384)
_WIDTHS_M = (64, 128, 256, 512)
_REPVIT: dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]] = {
    "RepViT-M0.9": (_WIDTHS_S, (2, 2, 14, 2), False),
    "RepViT-M1.0": ((56, 112, 224, 448), (2, 2, 14, 2), False),
    "RepViT-M1.1": (_WIDTHS_M, (2, 2, 12, 2), False),
    "RepViT-M1.5": (_WIDTHS_M, (4, 4, 24, 4), False),
    "RepViT-M2.3": ((80, 160, 320, 640), (6, 6, 34, 2), False),
    "RepViT-M1": (_WIDTHS_S, (2, 2, 14, 2), True),
    "RepViT-M2": (_WIDTHS_M, (2, 2, 12, 2), True),
    "RepViT-M3": (_WIDTHS_M, (4, 4, 18, 2), True),
}


def repvit_spec(name: str, num_classes: int = 1000, distillation: bool = True) -> RepViTSpec:
    """The registry model `name` (RepViT-M0.9 ...), with the distillation head by default (as
    the published checkpoints are trained and timm builds them)."""
    if name not in _REPVIT:
        raise SpecError(f"unknown RepViT model {name!r}; known: {', '.join(_REPVIT)}")
    widths, depths, legacy = _REPVIT[name]
    return RepViTSpec(name, widths, depths, legacy, distillation, num_classes)


def _entry(name: str) -> Callable[[int], RepViTSpec]:
    return lambda num_classes: repvit_spec(name, num_classes)


MODELS: dict[str, Callable[[int], RepViTSpec]] = {n: _entry(n) for n in _REPVIT}

# timm's names (`repvit_m0_9`, `repvit_m1_0`, ..., `repvit_m1`, `repvit_m2`, `repvit_m3`).
ALIASES: dict[str, str] = {n.replace("RepViT-M", "repvit_m").replace(".", "_"): n for n in _REPVIT}


# timm (`timm/models/repvit.py`, checked against 1.0.31): `stem.conv1`/`stem.conv2` (ConvNorm
# `c`/`bn`), `stages.{i}.downsample` (`pre_block`, `spatial_downsample`, `channel_downsample`,
# `ffn.conv1`/`.conv2`) and `stages.{i}.blocks.{j}` (`token_mixer` a RepVggDw with `conv`,
# `conv1`, `bn`; `se.fc1`/`se.fc2`; `channel_mixer.conv1`/`.conv2`), head `head.head.bn`/`.l`,
# `head.head_dist.bn`/`.l`; its `fuse()` puts the averaged Linear at `head`. The flat official
# index depends on the depths, so the rules are the model's (RepViTSpec.timm_rules).
KEYMAPS: dict[str, Callable[[RepViTSpec], list[tuple[str, str]]]] = {"timm": RepViTSpec.timm_rules}


def _int_arg(cls: str, name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(f"{cls} {name} must be an int, got {value!r}")
    return value


def official_repvgg_dw(ed: int) -> Block:
    """THU-MIG/RepViT `RepVGGDW(ed)` (the current version: plain conv1 and a BN after the sum):
    its train-form description, keys relative to the module (`conv.c`, `conv.bn`, `conv1`,
    `bn`; deploy `weight`, `bias` of the dw 3x3 conv its `fuse` returns)."""
    if _int_arg("RepVGGDW", "ed", ed) < 1:
        raise SpecError(f"RepVGGDW ed must be >= 1, got {ed}")
    return Block("", "RepVGGDW", (repvgg_dw("", ed),))


def official_repvit_block(
    inp: int, hidden_dim: int, oup: int, kernel_size: int, stride: int, use_se: bool | int, use_hs: bool | int
) -> RepViTBlockSpec:
    """THU-MIG/RepViT `RepViTBlock(inp, hidden_dim, oup, kernel_size, stride, use_se, use_hs)`
    (the current version, RepVGGDW with a BN after the sum). use_se / use_hs may be the 0 / 1
    of the official configuration rows. SpecError where the official asserts fail (stride not
    1 or 2, hidden_dim != 2 inp, a stride-1 block changing the channels)."""
    ints = (("inp", inp), ("hidden_dim", hidden_dim), ("oup", oup), ("kernel_size", kernel_size), ("stride", stride))
    for name, value in ints:
        _int_arg("RepViTBlock", name, value)
    for name, flag in (("use_se", use_se), ("use_hs", use_hs)):
        if flag not in (0, 1):
            raise SpecError(f"RepViTBlock {name} must be a bool (or 0 / 1), got {flag!r}")
    return RepViTBlockSpec(inp, hidden_dim, oup, kernel_size, stride, bool(use_se))


OFFICIAL = {"RepVGGDW": official_repvgg_dw, "RepViTBlock": official_repvit_block}

__all__ = [
    "RepViTBlockSpec",
    "RepViTSpec",
    "repvit_spec",
    "conv_bn",
    "repvgg_dw",
    "se_channels",
    "MODELS",
    "ALIASES",
    "KEYMAPS",
    "OFFICIAL",
    "official_repvgg_dw",
    "official_repvit_block",
    "SE_RATIO",
]
