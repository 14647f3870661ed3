"""ACNet's Asymmetric Convolution Block (DingXiaoH/ACNet `acnet/acb.py` `ACBlock`) as data.

Three branches, summed: kxk `square_conv` + `square_bn`, kx1 `ver_conv` + `ver_bn` (padding
(padding, padding - k // 2)), 1xk `hor_conv` + `hor_bn` (padding (padding - k // 2, padding)),
so the asymmetric kernels sit on the centre row / column of the square one; optionally one BN
`last_bn` after the sum (`use_last_bn`, in the repository's earlier acb.py). No activation.
Deploy form: one kxk conv `fused_conv` with bias (`last_bn` folded in).

Exactly fusable here: odd kernel_size, padding >= kernel_size // 2, dilation 1. The official
code crops the asymmetric branches' input when padding < kernel_size // 2 (no crop primitive in
the description) and its branches do not line up with dilation > 1 (its sum fails).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..blocks.nodes import BN, Block, Conv, Geometry, Rep
from ..errors import FusionError
from .official_args import grouped, positive, require, train_form_only, zeros_padding


@dataclass(frozen=True)
class ACBlockSpec:
    in_channels: int
    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    groups: int = 1
    last_bn: bool = False
    eps: float = 1e-5

    kind = "ACBlock"

    def __post_init__(self) -> None:
        if self.kernel_size % 2 == 0 or self.padding < self.kernel_size // 2:
            raise FusionError(
                f"ACBlock: needs an odd kernel_size and padding >= kernel_size // 2, "
                f"got kernel_size={self.kernel_size}, padding={self.padding}"
            )

    def describe(self) -> Block:
        cin, cout, k, p, eps = (self.in_channels, self.out_channels, self.kernel_size, self.padding, self.eps)
        geo: Geometry = {"stride": self.stride, "groups": self.groups}
        q = p - k // 2
        branches = (
            (Conv("square_conv", cin, cout, k, padding=p, **geo), BN("square_bn", cout, eps)),
            (Conv("ver_conv", cin, cout, (k, 1), padding=(p, q), **geo), BN("ver_bn", cout, eps)),
            (Conv("hor_conv", cin, cout, (1, k), padding=(q, p), **geo), BN("hor_bn", cout, eps)),
        )
        fused = Conv("fused_conv", cin, cout, k, padding=p, **geo)
        bn = BN("last_bn", cout, eps) if self.last_bn else None
        return Block("", self.kind, (Rep(branches, fused, bn=bn),))


def official_acblock(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    deploy: bool = False,
    use_affine: bool = True,
    reduce_gamma: bool = False,
    gamma_init: Any = None,
    use_last_bn: bool = False,
) -> ACBlockSpec:
    """DingXiaoH/ACNet `ACBlock(...)` (`use_last_bn` from the repository's earlier acb.py).
    `reduce_gamma` and `gamma_init` only set initial BN weights: accepted (not together, as the
    official asserts), they change nothing here. Refused with the reason: an even kernel_size,
    padding < kernel_size // 2 (cropping), dilation != 1, padding_mode other than 'zeros',
    use_affine=False (BNs without weight and bias)."""
    cls = "ACBlock"
    positive(
        cls, in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride, groups=groups
    )
    require(
        cls,
        kernel_size % 2 == 1,
        "kernel_size",
        kernel_size,
        "must be odd (the kx1 and 1xk kernels are centred in the kxk one)",
    )
    require(
        cls,
        isinstance(padding, int) and padding >= kernel_size // 2,
        "padding",
        padding,
        f"< kernel_size // 2 = {kernel_size // 2} crops the asymmetric branches' input: "
        "not supported (no crop primitive)",
    )
    require(
        cls,
        dilation == 1,
        "dilation",
        dilation,
        "the official asymmetric branches do not line up with a dilated square conv",
    )
    grouped(cls, in_channels, out_channels, groups)
    zeros_padding(cls, padding_mode)
    train_form_only(cls, deploy)
    require(cls, bool(use_affine), "use_affine", use_affine, "BNs without weight and bias are not supported")
    require(
        cls,
        not (reduce_gamma and (gamma_init is not None or use_last_bn)),
        "reduce_gamma",
        reduce_gamma,
        "the official block asserts it is not combined with gamma_init or use_last_bn",
    )
    return ACBlockSpec(in_channels, out_channels, kernel_size, stride, padding, groups, bool(use_last_bn))


OFFICIAL: dict[str, Callable[..., ACBlockSpec]] = {"ACBlock": official_acblock}

__all__ = ["ACBlockSpec", "official_acblock", "OFFICIAL"]
