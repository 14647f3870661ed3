"""What the graph passes (backends/torch/graph_fuse.py, backends/onnx) share, framework-free:
a branch found in a foreign graph as a chain of core primitives with their tensors (`Stage`),
the translation of a sum of such branches into the core's `Rep` and its fused (kernel, bias)
(`fuse_branches`: validation by `Rep`/check_rep, values by rep_kernel_bias, float64), and the
report of a pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import FusionError
from .fuse import rep_kernel_bias
from .fusion import KernelBias
from .nodes import BN, AvgPool, Branch, Conv, PadBN, Pair, Primitive, Rep, Scale, pair


@dataclass(frozen=True)
class Stage:
    """One primitive of a branch as found in a graph: the core node (its name is replaced when
    the Rep is built) and its tensors by field (`weight`, `bias`, `running_mean`, ...)."""

    node: Primitive
    params: Mapping[str, np.ndarray]

    @property
    def label(self) -> str:
        n = self.node
        if isinstance(n, Conv):
            return f"conv{n.kernel[0]}x{n.kernel[1]}"
        if isinstance(n, PadBN):
            return f"bnpad{n.pad}"
        if isinstance(n, AvgPool):
            return f"avgpool{n.kernel}"
        return "scale" if isinstance(n, Scale) else "bn"


def branch_kind(stages: Sequence[Stage]) -> str:
    """`conv3x3+bn`, `identity`, ... (the report's name of a branch)."""
    return "+".join(st.label for st in stages) or "identity"


def _span(kernel: int, dilation: int) -> int:
    """The input pixels a kernel of `kernel` taps dilated by `dilation` covers: (k - 1) d + 1."""
    return (kernel - 1) * dilation + 1


def fused_geometry(branches: Sequence[Branch], cin: int, cout: int) -> Conv:
    """The one conv a sum of branches can be. On each axis: the dilation D is the gcd of the
    dilations of the stages wider than one tap there (every branch's taps fall on its grid;
    that of the widest stage when none is wider), the kernel K covers the largest span
    (k - 1) d + 1 of a stage, K = (span - 1) / D + 1, with that stage's padding (plus a PadBN's
    before it); the stride of the stage with the largest kernel; the groups of the convs
    (depthwise when there is none). Whether every branch lines up with it is check_rep's call."""
    stages = []  # (kernel, stride, padding, dilation)
    for chain in branches:
        pad = 0
        for node in chain:
            if isinstance(node, PadBN):
                pad += node.pad
            elif isinstance(node, Conv):
                stages.append((node.kernel, node.stride, (node.padding[0] + pad, node.padding[1] + pad), node.dilation))
                pad = 0
            elif isinstance(node, AvgPool):
                stages.append((pair(node.kernel), pair(node.stride), (node.padding + pad,) * 2, (1, 1)))
                pad = 0
    convs = [n for chain in branches for n in chain if isinstance(n, Conv)]
    groups = convs[0].groups if convs else cin
    if not stages:
        return Conv("fused", cin, cout, 1, groups=groups)
    big = max(stages, key=lambda s: s[0][0] * s[0][1])
    kernel, padding, dilation = [], [], []
    for axis in (0, 1):
        widest = max(stages, key=lambda s: _span(s[0][axis], s[3][axis]))
        wide = [s[3][axis] for s in stages if s[0][axis] > 1]
        d = math.gcd(*wide) if wide else widest[3][axis]
        kernel.append((_span(widest[0][axis], widest[3][axis]) - 1) // d + 1)
        padding.append(widest[2][axis])
        dilation.append(d)
    return Conv(
        "fused", cin, cout, (kernel[0], kernel[1]), big[1], (padding[0], padding[1]), (dilation[0], dilation[1]), groups
    )


def fuse_branches(
    branches: Sequence[Sequence[Stage]], cin: int, cout: int, post_bn: Stage | None = None
) -> tuple[Conv, KernelBias]:
    """The conv (with bias) equal to the sum of `branches` (each a chain of stages reading one
    tensor of `cin` channels; the empty chain is the identity), then `post_bn`: its geometry and
    (kernel OIHW, bias). Raises FusionError (from the core's Rep validation) with the reason
    when the sum is not exactly one conv."""
    params: dict[str, np.ndarray] = {}
    desc: list[Branch] = []
    for i, stages in enumerate(branches):
        chain = []
        for j, st in enumerate(stages):
            name = f"b{i}_{j}"
            node = st.node
            chain.append(node if isinstance(node, AvgPool) else replace(node, name=name))
            params.update({f"{name}.{k}": v for k, v in st.params.items()})
        desc.append(tuple(chain))
    bn: BN | None = None
    if post_bn is not None:
        if not isinstance(post_bn.node, BN):
            raise FusionError(f"the node after a sum of branches must be a BN, got {post_bn.label}")
        bn = replace(post_bn.node, name="post_bn")
        params.update({f"post_bn.{k}": v for k, v in post_bn.params.items()})
    fused = fused_geometry(desc, cin, cout)
    rep = Rep(tuple(desc), fused, bn)
    return replace(fused, bias=True), rep_kernel_bias(rep, params)


def affine_bn(channels: int, scale: np.ndarray | None, shift: np.ndarray | None) -> Stage:
    """y = scale x + shift per channel as an exact BN stage (mean 0, var 1, eps 0), for graphs
    that spell a per-channel affine map as Mul / Add constants."""
    one = np.ones(channels)
    return Stage(
        BN("", channels, 0.0),
        {
            "weight": one if scale is None else np.broadcast_to(scale, (channels,)),
            "bias": np.zeros(channels) if shift is None else np.broadcast_to(shift, (channels,)),
            "running_mean": np.zeros(channels),
            "running_var": one,
        },
    )


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class FusedSum:
    """A sum (or a lone conv + BN / affine chain) replaced by one conv: the graph nodes it
    consumed, one kind per branch, the fused kernel size and the new node or module."""

    nodes: tuple[str, ...]
    branches: tuple[str, ...]
    kernel: Pair
    into: str
    op: str = "conv"
    """what it became: "conv" (the kernel is its size) or "linear" (the kernel is (1, 1))"""


@dataclass(frozen=True)
class LeftAlone:
    """A candidate left as it was, and why."""

    node: str
    reason: str


@dataclass
class FuseReport:
    capture: str
    fused: list[FusedSum] = field(default_factory=list)
    left: list[LeftAlone] = field(default_factory=list)
    before: Mapping[str, int] = field(default_factory=dict)
    """op counts (BN, Conv, Add, Linear, ...) of the captured graph; empty when not counted"""
    after: Mapping[str, int] = field(default_factory=dict)
    """the same counts in the fused graph"""

    def summary(self) -> str:
        """`ops before -> after: BN 61 -> 0, Conv 44 -> 22, ...` ('' when not counted)."""
        if not self.before:
            return ""
        parts = [f"{k} {self.before[k]} -> {self.after.get(k, 0)}" for k in self.before]
        return "ops before -> after: " + ", ".join(parts)

    def __str__(self) -> str:
        lines = [f"{self.capture}: {len(self.fused)} fused, {len(self.left)} left alone"]
        if self.before:
            lines.append(f"  {self.summary()}")
        for f in self.fused:
            into = f"conv{f.kernel[0]}x{f.kernel[1]}" if f.op == "conv" else f.op
            lines.append(f"  fused {' + '.join(f.branches)} -> {into} {f.into} (nodes {', '.join(f.nodes)})")
        for a in self.left:
            lines.append(f"  left  {a.node}: {a.reason}")
        return "\n".join(lines)


__all__ = [
    "Stage",
    "branch_kind",
    "fused_geometry",
    "fuse_branches",
    "affine_bn",
    "FusedSum",
    "LeftAlone",
    "FuseReport",
]
