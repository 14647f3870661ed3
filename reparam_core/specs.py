"""Architecture specs as plain data, and the model registry.

A spec says, for every block, what it is (kind, channels, stride, groups, dilation, SE, bias); the
backends, the parameter counter and the float64 oracle all walk the same spec, so topology cannot
drift between frameworks. Module paths (and so weight names) follow the official PyTorch code.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Union

from .errors import FusionError, UnknownModelError
from .fusion import branch_padding

Act = Literal["relu", "silu", "identity"]
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
    act: Act = "relu"
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
            raise FusionError(f"channels {self.in_channels} -> {self.out_channels} are not "
                              f"divisible by groups={self.groups}")
        if self.kernel_size % 2 == 0:
            raise FusionError(f"kernel_size must be odd to centre the 1x1 branch, got {self.kernel_size}")
        if self.se != "none" and self.se_channels < 1:
            raise FusionError(f"SE mode {self.se!r} needs se_channels >= 1, got {self.se_channels}")
        self.padding_1x1  # raises FusionError when the 1x1 branch cannot line up

    @property
    def padding_1x1(self) -> int:
        """Padding of the 1x1 branch: it lines up with the centre tap of the dilated kxk conv."""
        return branch_padding(self.kernel_size, self.padding, self.dilation, 1)

    @property
    def has_identity(self) -> bool:
        """The identity BN branch exists when shapes allow (and the conv is 'same')."""
        return (self.use_identity and self.in_channels == self.out_channels and self.stride == 1
                and self.padding == self.dilation * (self.kernel_size - 1) // 2)

    @property
    def se_module(self) -> str:
        return {"pre": "se", "post": "post_se"}.get(self.se, "")


@dataclass(frozen=True)
class RepGhostModuleSpec:
    """RepGhost module: primary 1x1 conv+BN(+ReLU), a depthwise `cheap_operation` conv+BN on its
    output, plus the re-parameterizable BN shortcut (`fusion_bn`) added to it; ReLU if `relu`.
    Deploy form: `cheap_operation` is one depthwise conv with bias (the BN shortcut fused in)."""

    in_channels: int
    out_channels: int
    kernel_size: int = 1
    dw_size: int = 3
    stride: int = 1
    relu: bool = True
    reparam_bn: bool = True
    eps: float = 1e-5


@dataclass(frozen=True)
class RepGhostBottleneckSpec:
    in_channels: int
    mid_channels: int
    out_channels: int
    dw_kernel_size: int = 3
    stride: int = 1
    se_channels: int = 0  # 0: no SqueezeExcite
    eps: float = 1e-5

    @property
    def ghost1(self) -> RepGhostModuleSpec:
        return RepGhostModuleSpec(self.in_channels, self.mid_channels, relu=True, eps=self.eps)

    @property
    def ghost2(self) -> RepGhostModuleSpec:
        return RepGhostModuleSpec(self.mid_channels, self.out_channels, relu=False, eps=self.eps)

    @property
    def has_conv_shortcut(self) -> bool:
        return not (self.in_channels == self.out_channels and self.stride == 1)


@dataclass(frozen=True)
class StageSpec:
    name: str
    blocks: tuple[RepBlockSpec, ...]


@dataclass(frozen=True)
class RepVGGSpec:
    """RepVGG and RepVGGplus: stem block `stage0`, named stages, global average pool, `linear`.

    RepVGGplus keeps its blocks under `stageN.blocks.i` (`stage_container="blocks"`) and has
    auxiliary heads (conv3x3 s2 + BN + ReLU, pool, linear) after the stages in `aux_heads`,
    in train form only."""

    name: str
    stem: RepBlockSpec
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

    def blocks(self) -> list[tuple[str, RepBlockSpec]]:
        """Every block with its module path, in forward order."""
        out = [("stage0", self.stem)]
        for st in self.stages:
            out += [(self.block_prefix(st.name, i), b) for i, b in enumerate(st.blocks)]
        return out

    def aux_channels(self, stage: str) -> int:
        return next(s for s in self.stages if s.name == stage).blocks[-1].out_channels


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


ModelSpec = Union[RepVGGSpec, RepGhostNetSpec]

# --------------------------------------------------------------------------- RepVGG family

_GROUPWISE_LAYERS = tuple(range(2, 27, 2))  # the official "optional groupwise layers"


def repvgg_spec(name: str, num_blocks: tuple[int, ...], widths: tuple[float, ...],
                groups: int = 1, se: SEMode = "none", se_divisor: int = 16,
                num_classes: int = 1000, plus: bool = False) -> RepVGGSpec:
    """Build a RepVGG(plus) spec the way the official code does: stem min(64, 64 w0), stages of
    64 w0, 128 w1, 256 w2, 512 w3 channels, first block of each stride 2, and `groups` on the
    even-numbered layers 2..26 (layer 0 is the stem)."""
    def block(cin: int, cout: int, stride: int, g: int) -> RepBlockSpec:
        return RepBlockSpec(cin, cout, 3, stride, groups=g, se=se,
                            se_channels=cout // se_divisor if se != "none" else 0)

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
        return RepVGGSpec(name, stem, tuple(stages), num_classes, stage_container="blocks",
                          aux_heads=("stage1", "stage2", "stage3_first"), family="repvggplus")
    return RepVGGSpec(name, stem, tuple(stages), num_classes)


_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)
_REPVGG: dict[str, dict] = {
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
}
_REPVGGPLUS: dict[str, dict] = {
    "RepVGGplus-L2pse": dict(num_blocks=(8, 14, 24, 1), widths=(2.5, 2.5, 2.5, 5), se="post",
                             se_divisor=4, plus=True),
}

# --------------------------------------------------------------------------- RepGhostNet

# (dw kernel, expansion, out channels, SE ratio, stride) per bottleneck, grouped into stages.
_REPGHOST_CFG: tuple[tuple[tuple[int, int, int, float, int], ...], ...] = (
    ((3, 8, 16, 0, 1),),
    ((3, 24, 24, 0, 2),),
    ((3, 36, 24, 0, 1),),
    ((5, 36, 40, 0.25, 2),),
    ((5, 60, 40, 0.25, 1),),
    ((3, 120, 80, 0, 2),),
    ((3, 100, 80, 0, 1), (3, 120, 80, 0, 1), (3, 120, 80, 0, 1),
     (3, 240, 112, 0.25, 1), (3, 336, 112, 0.25, 1)),
    ((5, 336, 160, 0.25, 2),),
    ((5, 480, 160, 0, 1), (5, 480, 160, 0.25, 1), (5, 480, 160, 0, 1), (5, 480, 160, 0.25, 1)),
)
_REPGHOST_WIDTHS = {"0_5x": 0.5, "0_58x": 0.58, "0_8x": 0.8, "1_0x": 1.0, "1_11x": 1.11,
                    "1_3x": 1.3, "1_5x": 1.5, "2_0x": 2.0}


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
    return RepGhostNetSpec(name, width, stem, tuple(stages), make_divisible(last_exp * width * 2, 4),
                           num_classes=num_classes)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[[int], ModelSpec]] = {}
for _n, _kw in {**_REPVGG, **_REPVGGPLUS}.items():
    _REGISTRY[_n] = (lambda n, kw: lambda nc: repvgg_spec(n, num_classes=nc, **kw))(_n, _kw)
for _suffix, _w in _REPGHOST_WIDTHS.items():
    _REGISTRY[f"repghostnet_{_suffix}"] = (
        lambda n, w: lambda nc: repghostnet_spec(n, w, nc))(f"repghostnet_{_suffix}", _w)


def list_models() -> list[str]:
    """Every model name the library can build, official names first."""
    return list(_REGISTRY)


def get_spec(name: str, num_classes: int = 1000) -> ModelSpec:
    """The spec of a registered model; UnknownModelError (with close names) otherwise."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(_REGISTRY)}"
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return _REGISTRY[name](num_classes)





BlockSpec = Union[RepBlockSpec, RepGhostModuleSpec, RepGhostBottleneckSpec]


def repconv_spec(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, act: Act = "silu", eps: float = 1e-3) -> RepBlockSpec:
    """A RepConv block spec with YOLOv7's defaults (SiLU; BN eps 1e-3 as YOLOv7 sets it)."""
    return RepBlockSpec(in_channels, out_channels, kernel_size, stride, groups=groups, act=act,
                        eps=eps, naming="repconv")


def block_kind(spec: BlockSpec) -> str:
    """The block class a spec describes, by the official class names: RepVGGBlock, RepConv
    (YOLOv7 naming), RepVGGplusBlock (post-SE), RepGhostModule, RepGhostBottleneck."""
    if isinstance(spec, RepBlockSpec):
        if spec.naming == "repconv":
            return "RepConv"
        return "RepVGGplusBlock" if spec.se == "post" else "RepVGGBlock"
    if isinstance(spec, RepGhostModuleSpec):
        return "RepGhostModule"
    if isinstance(spec, RepGhostBottleneckSpec):
        return "RepGhostBottleneck"
    raise TypeError(f"not a block spec: {type(spec).__name__}")
_BLOCK_KINDS: dict[str, type] = {"repblock": RepBlockSpec, "ghost_module": RepGhostModuleSpec,
                                 "ghost_bottleneck": RepGhostBottleneckSpec}


def block_spec_to_dict(spec: BlockSpec) -> dict:
    """A block spec as JSON-able data with its kind (for the MegEngine worker and JSON reports)."""
    kind = next(k for k, t in _BLOCK_KINDS.items() if isinstance(spec, t))
    return {"kind": kind, **asdict(spec)}


def block_spec_from_dict(data: dict) -> BlockSpec:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _BLOCK_KINDS:
        raise ValueError(f"unknown block kind {kind!r}; expected one of {', '.join(_BLOCK_KINDS)}")
    return _BLOCK_KINDS[kind](**data)


__all__ = ["RepBlockSpec", "RepGhostModuleSpec", "RepGhostBottleneckSpec", "StageSpec", "RepVGGSpec",
           "RepGhostNetSpec", "ModelSpec", "list_models", "get_spec", "repvgg_spec",
           "repghostnet_spec", "make_divisible", "BlockSpec",
           "block_spec_to_dict", "block_spec_from_dict", "repconv_spec", "block_kind"]
