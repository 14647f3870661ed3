"""QARepVGG as data: cxxgtxy/QARepVGG's `QARepVGGBlockV2` and its models, and meituan/YOLOv6's
`QARepVGGBlock` / `QARepVGGBlockV2`.

A QARepVGG block is act(BN(dense 3x3 conv+BN + 1x1 conv (no BN) + raw identity [+ 3x3 average
pool])): the identity (and YOLOv6 V2's `rbr_avg` pool, count_include_pad) only when in == out
and stride 1; ONE BN `bn` after the sum. Official names: `rbr_dense.conv`/`.bn`, `rbr_1x1`
(weight only), `bn`; deploy `rbr_reparam`. cxxgtxy folds `bn` into `rbr_reparam`; YOLOv6 keeps
it in its deploy form (for QAT): folded here by default, kept with `keep_post_bn=True`, described
as the Rep without its BN followed by a plain BN node (the same function).

Models (cxxgtxy `create_QARepVGGBlockV2_A0/B0`, official registry names `QARepVGGV2-A0/B0`):
the RepVGG layout (stem `stage0` 3 -> min(64, 64 w0) stride 2, stages of 64 w0, 128 w1, 256 w2,
512 w3 channels, first block of each stride 2, no groups), gap, `linear`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..blocks.nodes import BN, Act, AvgPool, Block, Branch, Conv, Geometry, Node, Rep
from ..errors import FusionError
from .official_args import ActName, activation, repvgg_geometry, require
from .repvgg import RepVGGSpec, StageSpec


@dataclass(frozen=True)
class QARepBlockSpec:
    """A QARepVGG block (3x3 only, padding 1). `avg_pool`: YOLOv6 V2's 3x3 average-pooling
    branch; `keep_post_bn`: the deploy form keeps `bn` after `rbr_reparam` (YOLOv6's);
    `yolov6`: stands for YOLOv6's class (its `QARepVGGBlock` is cxxgtxy's V2 structure)."""

    in_channels: int
    out_channels: int
    stride: int = 1
    groups: int = 1
    act: ActName = "relu"
    avg_pool: bool = False
    keep_post_bn: bool = False
    eps: float = 1e-5
    yolov6: bool = False

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "stride", "groups"):
            if getattr(self, name) < 1:
                raise FusionError(f"QARepVGG block {name} must be >= 1, got {getattr(self, name)}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise FusionError(
                f"channels {self.in_channels} -> {self.out_channels} are not divisible by groups={self.groups}"
            )

    @property
    def kind(self) -> str:
        """The official class: YOLOv6's QARepVGGBlock (no pool) or a QARepVGGBlockV2."""
        return "QARepVGGBlock" if self.yolov6 and not self.avg_pool else "QARepVGGBlockV2"

    @property
    def has_identity(self) -> bool:
        """The raw identity (and the average pool) exist when in == out and stride 1."""
        return self.in_channels == self.out_channels and self.stride == 1

    def describe(self) -> Block:
        cin, cout = self.in_channels, self.out_channels
        geo: Geometry = {"stride": self.stride, "groups": self.groups}
        branches: list[Branch] = [
            (Conv("rbr_dense.conv", cin, cout, 3, padding=1, **geo), BN("rbr_dense.bn", cout, self.eps)),
            (Conv("rbr_1x1", cin, cout, 1, **geo),),
        ]
        if self.has_identity:
            branches.append(())
            if self.avg_pool:
                branches.append((AvgPool(3, 1, 1),))
        fused = Conv("rbr_reparam", cin, cout, 3, padding=1, **geo)
        bn = BN("bn", cout, self.eps)
        body: list[Node] = (
            [Rep(tuple(branches), fused), bn] if self.keep_post_bn else [Rep(tuple(branches), fused, bn=bn)]
        )
        return Block("", self.kind, (*body, Act(self.act)))


def qarepvgg_spec(
    name: str, num_blocks: tuple[int, ...], widths: tuple[float, ...], num_classes: int = 1000
) -> RepVGGSpec:
    """A QARepVGG model laid out as the official `RepVGG(..., block_cls=QARepVGGBlockV2)`."""
    stem_ch = min(64, int(64 * widths[0]))
    stem = QARepBlockSpec(3, stem_ch, stride=2)
    planes = [int(64 * widths[0]), int(128 * widths[1]), int(256 * widths[2]), int(512 * widths[3])]
    cin, stages = stem_ch, []
    for i, (p, n) in enumerate(zip(planes, num_blocks)):
        blocks = tuple(QARepBlockSpec(cin if j == 0 else p, p, stride=2 if j == 0 else 1) for j in range(n))
        stages.append(StageSpec(f"stage{i + 1}", blocks))
        cin = p
    return RepVGGSpec(name, stem, tuple(stages), num_classes)


_QAREPVGG: dict[str, dict[str, Any]] = {
    "QARepVGG-A0": dict(num_blocks=(2, 4, 14, 1), widths=(0.75, 0.75, 0.75, 2.5)),
    "QARepVGG-B0": dict(num_blocks=(4, 6, 16, 1), widths=(1, 1, 1, 2.5)),
    # Not an official model: RepVGG-mini's layout with QARepVGG blocks (the quantize demo).
    "QARepVGG-mini": dict(num_blocks=(1, 2, 2, 1), widths=(0.25, 0.25, 0.25, 0.5)),
}


def _entry(name: str, kw: dict[str, Any]) -> Callable[[int], RepVGGSpec]:
    return lambda num_classes: qarepvgg_spec(name, num_classes=num_classes, **kw)


MODELS: dict[str, Callable[[int], RepVGGSpec]] = {n: _entry(n, kw) for n, kw in _QAREPVGG.items()}

# The official registry's names (cxxgtxy/QARepVGG `func_dict`). Its own `QARepVGG-A0` is another
# block (QARepVGGBlock, V1 of the paper); the registry name here means the V2 model.
ALIASES: dict[str, str] = {"QARepVGGV2-A0": "QARepVGG-A0", "QARepVGGV2-B0": "QARepVGG-B0"}

# ----------------------------------------------------------------------------- official constructors


def _common(
    cls: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    padding_mode: str,
    deploy: bool,
    use_se: bool,
) -> None:
    repvgg_geometry(
        cls, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, deploy
    )
    require(
        cls,
        not use_se,
        "use_se",
        use_se,
        "not supported: the official SE sits between the "
        "sum and the post-sum BN, which its deploy form folds across it (not the same function)"
        if cls == "QARepVGGBlockV2"
        else "the official block raises NotImplementedError",
    )


def official_qarepvgg_block_v2(
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
    use_scale: bool = False,
    act: Any = "relu",
    drop_path_ratio: float = 0.0,
) -> QARepBlockSpec:
    """cxxgtxy/QARepVGG `QARepVGGBlockV2(...)`. `use_scale` builds nothing in this class and
    `drop_path_ratio` acts in training only: both are accepted and change nothing here. `act`:
    'relu'/'silu'/'identity' or an nn.ReLU / nn.SiLU / nn.Identity module (PReLU has
    parameters: refused)."""
    cls = "QARepVGGBlockV2"
    _common(
        cls, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, deploy, use_se
    )
    require(cls, 0.0 <= drop_path_ratio < 1.0, "drop_path_ratio", drop_path_ratio, "must be in [0, 1)")
    return QARepBlockSpec(in_channels, out_channels, stride, groups, activation(cls, "act", act))


def _yolov6(kind: str, avg_pool: bool) -> Callable[..., QARepBlockSpec]:
    def ctor(
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_se: bool = False,
        *,
        keep_post_bn: bool = False,
    ) -> QARepBlockSpec:
        _common(
            f"yolov6.{kind}",
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            padding_mode,
            deploy,
            use_se,
        )
        return QARepBlockSpec(
            in_channels, out_channels, stride, groups, avg_pool=avg_pool, keep_post_bn=bool(keep_post_bn), yolov6=True
        )

    ctor.__name__ = f"official_yolov6_{kind}"
    ctor.__doc__ = (
        f"meituan/YOLOv6 `yolov6.layers.common.{kind}(...)` (ReLU; "
        f"{'with' if avg_pool else 'without'} the `rbr_avg` 3x3 pool branch). "
        "keep_post_bn=True (not an official argument): the deploy form keeps `bn` "
        "after `rbr_reparam` as YOLOv6's switch_to_deploy does; by default it is "
        "folded in."
    )
    return ctor


OFFICIAL: dict[str, Callable[..., QARepBlockSpec]] = {
    "QARepVGGBlockV2": official_qarepvgg_block_v2,
    "yolov6.QARepVGGBlock": _yolov6("QARepVGGBlock", avg_pool=False),
    "yolov6.QARepVGGBlockV2": _yolov6("QARepVGGBlockV2", avg_pool=True),
}

__all__ = ["QARepBlockSpec", "qarepvgg_spec", "MODELS", "ALIASES", "OFFICIAL", "official_qarepvgg_block_v2"]
