"""Diverse Branch Block (DingXiaoH/DiverseBranchBlock `DiverseBranchBlock`) as data.

Branches, summed, then the optional nonlinearity (identity by default):
- `dbb_origin`: kxk conv `conv` + BN `bn` (stride, padding k // 2, groups);
- `dbb_avg`: when groups < out_channels, 1x1 conv `conv` -> BN-and-pad `bn` (its BN at
  `bn.bn`, padding k // 2 filled with BN(0)) -> k x k average pool `avg` (stride, no padding)
  -> BN `avgbn`; otherwise (depthwise) the pool alone, padding k // 2 (count_include_pad), then
  `avgbn`;
- `dbb_1x1`: 1x1 conv `conv` + BN `bn` (stride), only when groups < out_channels;
- `dbb_1x1_kxk`: 1x1 `idconv1` (an IdentityBasedConv1x1: its weight is the difference from the
  identity, a `plus_identity` Conv) when the internal width equals in_channels, else a 1x1
  `conv1` to the internal width; BN-and-pad `bn1` (BN at `bn1.bn`); kxk `conv2` (stride, no
  padding); BN `bn2`. Internal width: in_channels when groups < out_channels, else 2 in_channels
  (`internal_channels_1x1_3x3` overrides).
Deploy form: one kxk conv `dbb_reparam` with bias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..blocks.nodes import BN, Act, AvgPool, Block, Branch, Conv, PadBN, Rep
from ..errors import FusionError
from .official_args import ActName, activation, grouped, positive, require, train_form_only


@dataclass(frozen=True)
class DiverseBranchBlockSpec:
    """A DBB (odd kernel, padding kernel_size // 2, dilation 1, as the official code asserts
    or needs). `internal_channels` 0: the official default."""

    in_channels: int
    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    groups: int = 1
    internal_channels: int = 0
    act: ActName = "identity"
    eps: float = 1e-5

    kind = "DiverseBranchBlock"

    def __post_init__(self) -> None:
        if self.kernel_size % 2 == 0:
            raise FusionError(f"DiverseBranchBlock: kernel_size must be odd, got {self.kernel_size}")
        if self.groups >= self.out_channels and self.in_channels != self.out_channels:
            raise FusionError(
                f"DiverseBranchBlock: with groups == out_channels the average-pool "
                f"branch has no conv and needs in == out channels, got "
                f"{self.in_channels} -> {self.out_channels}"
            )
        if self.internal % self.groups:
            raise FusionError(
                f"DiverseBranchBlock: internal channels {self.internal} are not divisible by groups={self.groups}"
            )

    @property
    def internal(self) -> int:
        """The width between the 1x1 and the kxk conv of `dbb_1x1_kxk`."""
        if self.internal_channels:
            return self.internal_channels
        return self.in_channels if self.groups < self.out_channels else 2 * self.in_channels

    def describe(self) -> Block:
        cin, cout, k, g, s, eps = (
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.groups,
            self.stride,
            self.eps,
        )
        p, mid = k // 2, self.internal
        branches: list[Branch] = [
            (Conv("dbb_origin.conv", cin, cout, k, s, p, groups=g), BN("dbb_origin.bn", cout, eps))
        ]
        if g < cout:
            branches.append(
                (
                    Conv("dbb_avg.conv", cin, cout, 1, groups=g),
                    PadBN("dbb_avg.bn.bn", cout, p, eps),
                    AvgPool(k, s, 0),
                    BN("dbb_avg.avgbn", cout, eps),
                )
            )
            branches.append((Conv("dbb_1x1.conv", cin, cout, 1, s, groups=g), BN("dbb_1x1.bn", cout, eps)))
        else:
            branches.append((AvgPool(k, s, p), BN("dbb_avg.avgbn", cout, eps)))
        first = (
            Conv("dbb_1x1_kxk.idconv1", cin, cin, 1, groups=g, plus_identity=True)
            if mid == cin
            else Conv("dbb_1x1_kxk.conv1", cin, mid, 1, groups=g)
        )
        branches.append(
            (
                first,
                PadBN("dbb_1x1_kxk.bn1.bn", mid, p, eps),
                Conv("dbb_1x1_kxk.conv2", mid, cout, k, s, groups=g),
                BN("dbb_1x1_kxk.bn2", cout, eps),
            )
        )
        fused = Conv("dbb_reparam", cin, cout, k, s, p, groups=g)
        return Block("", self.kind, (Rep(tuple(branches), fused), Act(self.act)))


def official_diverse_branch_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    internal_channels_1x1_3x3: int | None = None,
    deploy: bool = False,
    nonlinear: Any = None,
    single_init: bool = False,
) -> DiverseBranchBlockSpec:
    """DingXiaoH/DiverseBranchBlock `DiverseBranchBlock(...)`: padding must be kernel_size // 2
    (the official assert), kernel_size odd, dilation 1 (only `dbb_origin` would dilate: the
    branches would not line up). `nonlinear`: None (identity), 'relu'/'silu'/'identity' or an
    nn.ReLU / nn.SiLU / nn.Identity module. `single_init` only sets initial BN weights: accepted,
    changes nothing here."""
    cls = "DiverseBranchBlock"
    positive(
        cls, in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride, groups=groups
    )
    require(
        cls,
        padding == kernel_size // 2,
        "padding",
        padding,
        f"the official block asserts padding == kernel_size // 2 = {kernel_size // 2}",
    )
    require(
        cls,
        kernel_size % 2 == 1,
        "kernel_size",
        kernel_size,
        "must be odd (the 1x1 and pooling branches are centred in the kxk kernel)",
    )
    require(
        cls,
        dilation == 1,
        "dilation",
        dilation,
        "only dbb_origin would dilate: the other branches would not line up with it",
    )
    grouped(cls, in_channels, out_channels, groups)
    require(
        cls,
        groups < out_channels or in_channels == out_channels,
        "groups",
        groups,
        f"== out_channels pools the input directly: needs in_channels == out_channels, got "
        f"{in_channels} -> {out_channels}",
    )
    if internal_channels_1x1_3x3 is not None:
        positive(cls, internal_channels_1x1_3x3=internal_channels_1x1_3x3)
        require(
            cls,
            internal_channels_1x1_3x3 % groups == 0,
            "internal_channels_1x1_3x3",
            internal_channels_1x1_3x3,
            f"must be divisible by groups={groups}",
        )
    train_form_only(cls, deploy)
    act = "identity" if nonlinear is None else activation(cls, "nonlinear", nonlinear)
    return DiverseBranchBlockSpec(
        in_channels, out_channels, kernel_size, stride, groups, internal_channels_1x1_3x3 or 0, act
    )


OFFICIAL: dict[str, Callable[..., DiverseBranchBlockSpec]] = {"DiverseBranchBlock": official_diverse_branch_block}

__all__ = ["DiverseBranchBlockSpec", "official_diverse_branch_block", "OFFICIAL"]
