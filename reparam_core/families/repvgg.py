"""RepVGG, RepVGGplus and YOLOv7's RepConv as data: the block and model specs, their
descriptions, and the registry entries.

A RepVGG block is act(SE_pre(dense kxk conv+BN + 1x1 conv+BN + identity BN)) or
SE_post(act(...)); its deploy form is one kxk conv `rbr_reparam`. Module paths (and so weight
names) are the official PyTorch ones: `rbr_dense.conv`/`.bn` (YOLOv7: `rbr_dense.0`/`.1`),
`rbr_1x1`, `rbr_identity`, `se.down`/`se.up` or `post_se`, stages `stageN.i` (RepVGGplus:
`stageN.blocks.i`), `linear`, aux heads `stage1_aux.0.conv` ... `stage1_aux.3`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from ..blocks.fusion import branch_padding
from ..blocks.nodes import (
    BN,
    SE,
    Act,
    Aux,
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
)
from ..errors import FusionError
from .official_args import ActName, activation, grouped, positive, repvgg_geometry, require, train_form_only

SEMode = Literal["none", "pre", "post"]


@dataclass(frozen=True)
class RepBlockSpec:
    """A RepVGG-style block: kxk conv+BN, 1x1 conv+BN and (when C_in == C_out and stride 1) an
    identity BN, summed; then an optional SE and the activation. One kxk conv after fusion.

    `se="pre"` puts SE before the activation (RepVGG-D2se, module `se`), `se="post"` after it
    (RepVGGplus, module `post_se`). `naming="repconv"` names the conv/BN pairs `0`/`1` as
    YOLOv7's RepConv does instead of `conv`/`bn`.
    """

    in_channels: int
    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    padding: int = -1  # -1: "same", dilation * (kernel_size - 1) / 2
    se: SEMode = "none"
    se_channels: int = 0
    conv_bias: bool = False
    act: ActName = "relu"
    use_identity: bool = True
    eps: float = 1e-5
    naming: Literal["repvgg", "repconv"] = "repvgg"

    def __post_init__(self) -> None:
        if self.padding < 0:
            object.__setattr__(self, "padding", self.dilation * (self.kernel_size - 1) // 2)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups"):
            if getattr(self, name) < 1:
                raise FusionError(f"block {name} must be >= 1, got {getattr(self, name)}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise FusionError(
                f"channels {self.in_channels} -> {self.out_channels} are not divisible by groups={self.groups}"
            )
        if self.kernel_size % 2 == 0:
            raise FusionError(f"kernel_size must be odd to centre the 1x1 branch, got {self.kernel_size}")
        if self.se != "none" and self.se_channels < 1:
            raise FusionError(f"SE mode {self.se!r} needs se_channels >= 1, got {self.se_channels}")
        if self.act not in ("relu", "silu", "identity"):
            raise FusionError(f"act must be 'relu', 'silu' or 'identity', got {self.act!r}")
        _ = self.padding_1x1  # raises FusionError when the 1x1 branch cannot line up

    @property
    def padding_1x1(self) -> int:
        """Padding of the 1x1 branch: it lines up with the centre tap of the dilated kxk conv."""
        return branch_padding(self.kernel_size, self.padding, self.dilation, 1)

    @property
    def has_identity(self) -> bool:
        """The identity BN branch exists when shapes allow (and the conv is 'same')."""
        return (
            self.use_identity
            and self.in_channels == self.out_channels
            and self.stride == 1
            and self.padding == self.dilation * (self.kernel_size - 1) // 2
        )

    @property
    def se_module(self) -> str:
        return {"pre": "se", "post": "post_se"}.get(self.se, "")

    @property
    def kind(self) -> str:
        """The official class: RepConv (YOLOv7 naming), RepVGGplusBlock (post-SE) or RepVGGBlock."""
        if self.naming == "repconv":
            return "RepConv"
        return "RepVGGplusBlock" if self.se == "post" else "RepVGGBlock"

    def describe(self) -> Block:
        conv, bn = ("0", "1") if self.naming == "repconv" else ("conv", "bn")
        cin, cout, k = self.in_channels, self.out_channels, self.kernel_size
        geo: Geometry = {"stride": self.stride, "dilation": self.dilation, "groups": self.groups}
        branches: list[Branch] = [
            (
                Conv(f"rbr_dense.{conv}", cin, cout, k, padding=self.padding, bias=self.conv_bias, **geo),
                BN(f"rbr_dense.{bn}", cout, self.eps),
            ),
            (
                Conv(f"rbr_1x1.{conv}", cin, cout, 1, padding=self.padding_1x1, bias=self.conv_bias, **geo),
                BN(f"rbr_1x1.{bn}", cout, self.eps),
            ),
        ]
        if self.has_identity:
            branches.append((BN("rbr_identity", cout, self.eps),))
        body: list[Node] = [Rep(tuple(branches), Conv("rbr_reparam", cin, cout, k, padding=self.padding, **geo))]
        se = SE(self.se_module, cout, self.se_channels)
        if self.se == "pre":
            body += [se, Act(self.act)]
        elif self.se == "post":
            body += [Act(self.act), se]
        else:
            body.append(Act(self.act))
        return Block("", self.kind, tuple(body))


def repconv_spec(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: ActName = "silu",
    eps: float = 1e-3,
) -> RepBlockSpec:
    """A RepConv block spec with YOLOv7's defaults: SiLU, and BN eps 1e-3 as a YOLOv7 `Model`
    sets it (the standalone class keeps torch's 1e-5: pass eps=1e-5 for that)."""
    return RepBlockSpec(
        in_channels, out_channels, kernel_size, stride, groups=groups, act=act, eps=eps, naming="repconv"
    )


class VGGBlock(Protocol):
    """What a RepVGG-style model needs of its blocks (RepBlockSpec, QARepVGG's block spec)."""

    @property
    def in_channels(self) -> int: ...

    @property
    def out_channels(self) -> int: ...

    @property
    def eps(self) -> float: ...

    def describe(self) -> Block: ...


@dataclass(frozen=True)
class StageSpec:
    name: str
    blocks: tuple[VGGBlock, ...]


@dataclass(frozen=True)
class RepVGGSpec:
    """RepVGG and RepVGGplus: stem block `stage0`, named stages, global average pool, `linear`.

    RepVGGplus keeps its blocks under `stageN.blocks.i` (`stage_container="blocks"`) and has
    auxiliary heads (conv3x3 s2 + BN + ReLU, pool, linear) after the stages in `aux_heads`,
    in train form only."""

    name: str
    stem: VGGBlock
    stages: tuple[StageSpec, ...]
    num_classes: int = 1000
    stage_container: str = ""
    aux_heads: tuple[str, ...] = ()
    family: Literal["repvgg", "repvggplus"] = "repvgg"

    @property
    def num_features(self) -> int:
        return self.stages[-1].blocks[-1].out_channels

    def block_prefix(self, stage: str, index: int) -> str:
        return f"{stage}.{self.stage_container}.{index}" if self.stage_container else f"{stage}.{index}"

    def blocks(self) -> list[tuple[str, VGGBlock]]:
        """Every block with its module path, in forward order."""
        out = [("stage0", self.stem)]
        for st in self.stages:
            out += [(self.block_prefix(st.name, i), b) for i, b in enumerate(st.blocks)]
        return out

    def aux_channels(self, stage: str) -> int:
        return next(s for s in self.stages if s.name == stage).blocks[-1].out_channels

    def _aux_head(self, stage: str) -> Aux:
        c, name = self.aux_channels(stage), f"{stage}_aux"
        last = self.block_prefix(stage, len(next(s for s in self.stages if s.name == stage).blocks) - 1)
        return Aux(
            name,
            last,
            (
                Conv(f"{name}.0.conv", c, c, 3, stride=2, padding=1),
                BN(f"{name}.0.bn", c, self.stem.eps),
                Act("relu"),
                GlobalPool(),
                Flatten(),
                Linear(f"{name}.3", c, self.num_classes),
            ),
        )

    def describe(self) -> Model:
        body: list[Node] = [replace(b.describe(), name=prefix) for prefix, b in self.blocks()]
        body += [GlobalPool(), Flatten(), Linear("linear", self.num_features, self.num_classes)]
        kind = "RepVGGplus" if self.family == "repvggplus" else "RepVGG"
        return Model(self.name, kind, tuple(body), tuple(self._aux_head(s) for s in self.aux_heads))


_GROUPWISE_LAYERS = tuple(range(2, 27, 2))  # the official "optional groupwise layers"


def repvgg_spec(
    name: str,
    num_blocks: tuple[int, ...],
    widths: tuple[float, ...],
    groups: int = 1,
    se: SEMode = "none",
    se_divisor: int = 16,
    num_classes: int = 1000,
    plus: bool = False,
) -> RepVGGSpec:
    """Build a RepVGG(plus) spec the way the official code does: stem min(64, 64 w0), stages of
    64 w0, 128 w1, 256 w2, 512 w3 channels, first block of each stride 2, and `groups` on the
    even-numbered layers 2..26 (layer 0 is the stem)."""

    def block(cin: int, cout: int, stride: int, g: int) -> RepBlockSpec:
        return RepBlockSpec(
            cin, cout, 3, stride, groups=g, se=se, se_channels=cout // se_divisor if se != "none" else 0
        )

    stem_ch = min(64, int(64 * widths[0]))
    stem = block(3, stem_ch, 2, 1)
    planes = [int(64 * widths[0]), int(128 * widths[1]), int(256 * widths[2]), int(512 * widths[3])]
    layer = 1
    cin = stem_ch
    stages: list[StageSpec] = []
    plan: list[tuple[str, int, int, int]] = []  # name, planes, count, stride
    for i, (p, n) in enumerate(zip(planes, num_blocks)):
        if plus and i == 2:  # RepVGGplus splits stage3 to hang an aux head in its middle
            plan += [("stage3_first", p, n // 2, 2), ("stage3_second", p, n // 2, 1)]
        else:
            plan.append((f"stage{i + 1}", p, n, 2))
    for sname, p, n, stride in plan:
        blocks = []
        for j in range(n):
            g = groups if (groups > 1 and layer in _GROUPWISE_LAYERS) else 1
            blocks.append(block(cin, p, stride if j == 0 else 1, g))
            cin = p
            layer += 1
        stages.append(StageSpec(sname, tuple(blocks)))
    if plus:
        return RepVGGSpec(
            name,
            stem,
            tuple(stages),
            num_classes,
            stage_container="blocks",
            aux_heads=("stage1", "stage2", "stage3_first"),
            family="repvggplus",
        )
    return RepVGGSpec(name, stem, tuple(stages), num_classes)


_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)
_REPVGG: dict[str, dict[str, Any]] = {
    "RepVGG-A0": dict(num_blocks=_A, widths=(0.75, 0.75, 0.75, 2.5)),
    "RepVGG-A1": dict(num_blocks=_A, widths=(1, 1, 1, 2.5)),
    "RepVGG-A2": dict(num_blocks=_A, widths=(1.5, 1.5, 1.5, 2.75)),
    "RepVGG-B0": dict(num_blocks=_B, widths=(1, 1, 1, 2.5)),
    "RepVGG-B1": dict(num_blocks=_B, widths=(2, 2, 2, 4)),
    "RepVGG-B1g2": dict(num_blocks=_B, widths=(2, 2, 2, 4), groups=2),
    "RepVGG-B1g4": dict(num_blocks=_B, widths=(2, 2, 2, 4), groups=4),
    "RepVGG-B2": dict(num_blocks=_B, widths=(2.5, 2.5, 2.5, 5)),
    "RepVGG-B2g2": dict(num_blocks=_B, widths=(2.5, 2.5, 2.5, 5), groups=2),
    "RepVGG-B2g4": dict(num_blocks=_B, widths=(2.5, 2.5, 2.5, 5), groups=4),
    "RepVGG-B3": dict(num_blocks=_B, widths=(3, 3, 3, 5)),
    "RepVGG-B3g2": dict(num_blocks=_B, widths=(3, 3, 3, 5), groups=2),
    "RepVGG-B3g4": dict(num_blocks=_B, widths=(3, 3, 3, 5), groups=4),
    "RepVGG-D2se": dict(num_blocks=(8, 14, 24, 1), widths=(2.5, 2.5, 2.5, 5), se="pre"),
    # Not an official model: the same block structure sized for 32x32 inputs (the demo).
    "RepVGG-mini": dict(num_blocks=(1, 2, 2, 1), widths=(0.25, 0.25, 0.25, 0.5)),
    "RepVGGplus-L2pse": dict(num_blocks=(8, 14, 24, 1), widths=(2.5, 2.5, 2.5, 5), se="post", se_divisor=4, plus=True),
}


def _entry(name: str, kw: dict[str, Any]) -> Callable[[int], RepVGGSpec]:
    return lambda num_classes: repvgg_spec(name, num_classes=num_classes, **kw)


MODELS: dict[str, Callable[[int], RepVGGSpec]] = {n: _entry(n, kw) for n, kw in _REPVGG.items()}

# timm's model names (`repvgg_a0`, `repvgg_b1g4`, `repvgg_d2se`) as aliases of the registry names.
ALIASES: dict[str, str] = {
    n.replace("RepVGG-", "repvgg_").lower(): n for n in _REPVGG if n.startswith("RepVGG-") and n != "RepVGG-mini"
}

# Other implementations' names (reparam_core.weights.keymaps: (foreign, canonical) templates, both ways).
# Checked against the sources (facts only):
# - timm `byobnet.py` (`repvgg_a0` ... `repvgg_d2se`): the stem RepVggBlock is `stem`, stages
#   `stages.{0..3}.{j}` with the official depths, strides and channels, so the map is 1:1.
#   Inside a block `conv_kxk`, `conv_1x1`, `identity` (a BatchNormAct2d: same fields),
#   `reparam_conv`, SE `attn.fc1`/`attn.fc2` (before the activation, as RepVGG-D2se); `head.fc`.
#   timm groups blocks with an odd index within the stage, the official code even global layer
#   indices from 1; with the even stage depths of every grouped model the two coincide.
# - mmpretrain `RepVGG` backbone in an ImageClassifier: `backbone.stem`, `backbone.stage_{1..4}.j`,
#   `branch_3x3.{conv,norm}`, `branch_1x1.{conv,norm}`, `branch_norm`, `branch_reparam`, SE
#   `se_layer.conv{1,2}.conv`, head `head.fc` (LinearClsHead).
# - basecls (megvii-research, MegEngine): the official block names, SE as `se.f_ex.0`/`se.f_ex.2`,
#   head `head.fc`.
KEYMAPS: dict[str, list[tuple[str, str]]] = {
    "basecls": [
        ("^head.fc.", "^linear."),
        ("se.f_ex.0.", "se.down."),
        ("se.f_ex.2.", "se.up."),
    ],
    "mmpretrain": [
        ("^backbone.stem.", "^stage0."),
        ("^backbone.stage_{i}.{j}.", "^stage{i}.{j}."),
        ("^head.fc.", "^linear."),
        ("branch_3x3.conv.", "rbr_dense.conv."),
        ("branch_3x3.norm.", "rbr_dense.bn."),
        ("branch_1x1.conv.", "rbr_1x1.conv."),
        ("branch_1x1.norm.", "rbr_1x1.bn."),
        ("branch_norm.", "rbr_identity."),
        ("branch_reparam.", "rbr_reparam."),
        ("se_layer.conv1.conv.", "se.down."),
        ("se_layer.conv2.conv.", "se.up."),
    ],
    "timm": [
        ("^stem.", "^stage0."),
        ("^stages.{i}.{j}.", "^stage{i+1}.{j}."),
        ("^head.fc.", "^linear."),
        ("conv_kxk.conv.", "rbr_dense.conv."),
        ("conv_kxk.bn.", "rbr_dense.bn."),
        ("conv_1x1.conv.", "rbr_1x1.conv."),
        ("conv_1x1.bn.", "rbr_1x1.bn."),
        ("identity.", "rbr_identity."),
        ("reparam_conv.", "rbr_reparam."),
        ("attn.fc1.", "se.down."),
        ("attn.fc2.", "se.up."),
    ],
}


# ----------------------------------------------------------------------------- official constructors


def official_repvgg_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    deploy: bool = False,
    use_se: bool = False,
) -> RepBlockSpec:
    """DingXiaoH/RepVGG `RepVGGBlock(...)`: kernel_size 3 and padding 1 (the official asserts),
    the 1x1 branch padded `padding - kernel_size // 2` = 0, the identity BN when in == out and
    stride 1, SE (`se.down`/`se.up`, out_channels // 16 hidden) before the ReLU with use_se.
    The official train form builds its convs without `dilation` (only its deploy conv takes
    it), so only dilation=1 gives the same function in both forms."""
    cls = "RepVGGBlock"
    repvgg_geometry(
        cls, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, deploy
    )
    require(
        cls,
        not use_se or out_channels >= 16,
        "use_se",
        use_se,
        f"SE has out_channels // 16 hidden channels: out_channels={out_channels} gives 0",
    )
    return RepBlockSpec(
        in_channels,
        out_channels,
        3,
        stride,
        groups=groups,
        padding=1,
        se="pre" if use_se else "none",
        se_channels=out_channels // 16 if use_se else 0,
    )


def _autopad(k: int, p: int | None) -> int:
    return k // 2 if p is None else p


def official_repconv(
    c1: int, c2: int, k: int = 3, s: int = 1, p: int | None = None, g: int = 1, act: Any = True, deploy: bool = False
) -> RepBlockSpec:
    """WongKinYiu/yolov7 `RepConv(...)`: k 3 and autopad(k, p) == 1 (the official asserts);
    act=True is SiLU, act=False / None the identity, or an nn.ReLU / nn.SiLU / nn.Identity
    module (a string is refused: the official class would make it nn.Identity); BN eps 1e-5
    (torch's default: the standalone class; a YOLOv7 `Model` sets 1e-3, see repconv_spec)."""
    cls = "RepConv"
    positive(cls, c1=c1, c2=c2, s=s, g=g)
    require(cls, k == 3, "k", k, "the official block asserts 3")
    require(cls, _autopad(k, p) == 1, "p", p, "the official block asserts autopad(k, p) == 1")
    grouped(cls, c1, c2, g)
    train_form_only(cls, deploy)
    require(
        cls,
        not isinstance(act, str),
        "act",
        act,
        "the official block takes a module (a "
        "string would silently become nn.Identity there); pass True, False or a module",
    )
    fn = "silu" if act is True else "identity" if act is False or act is None else activation(cls, "act", act)
    return repconv_spec(c1, c2, 3, s, g, act=fn, eps=1e-5)


OFFICIAL: dict[str, Callable[..., RepBlockSpec]] = {"RepVGGBlock": official_repvgg_block, "RepConv": official_repconv}

__all__ = [
    "RepBlockSpec",
    "StageSpec",
    "RepVGGSpec",
    "repvgg_spec",
    "repconv_spec",
    "MODELS",
    "ALIASES",
    "KEYMAPS",
    "OFFICIAL",
    "VGGBlock",
    "official_repvgg_block",
    "official_repconv",
]
