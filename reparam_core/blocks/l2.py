"""RepVGGplus' custom L2: where its inputs live in a block (from the description), and the one
formula every backend evaluates on its own differentiable arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from .nodes import BN, Block, Conv, Pair, Rep


@dataclass(frozen=True)
class L2Terms:
    """The modules of one block that the custom L2 reads (names relative to the block): the
    kxk conv+BN branch, the 1x1 conv+BN branch and the identity BN (None when absent)."""

    dense_conv: str
    dense_bn: str
    one_conv: str
    one_bn: str
    identity_bn: str | None
    out_channels: int
    groups: int
    kernel: Pair

    @property
    def centre(self) -> Pair:
        """The index of the centre tap of the dense kernel."""
        return (self.kernel[0] // 2, self.kernel[1] // 2)


def l2_terms(block: Block) -> L2Terms:
    """The custom-L2 inputs of a block whose Rep is kxk conv+BN, 1x1 conv+BN [, BN]."""
    rep = next((n for n in block.body if isinstance(n, Rep)), None)
    if rep is None:
        raise SpecError(f"{block.kind}: the custom L2 needs a re-parameterizable block")
    fused = rep.fused
    if not isinstance(fused, Conv):
        raise SpecError(f"{block.kind}: the custom L2 needs a Rep fused into a conv, not a {type(fused).__name__}")
    dense: tuple[Conv, BN] | None = None
    one: tuple[Conv, BN] | None = None
    ident: BN | None = None
    for br in rep.branches:
        if len(br) == 2 and isinstance(br[0], Conv) and isinstance(br[1], BN):
            if br[0].kernel == fused.kernel and dense is None:
                dense = (br[0], br[1])
            elif br[0].kernel == (1, 1):
                one = (br[0], br[1])
        elif len(br) == 1 and isinstance(br[0], BN):
            ident = br[0]
    if dense is None or one is None:
        raise SpecError(f"{block.kind}: the custom L2 needs a kxk conv+BN and a 1x1 conv+BN branch")
    return L2Terms(
        dense[0].name,
        dense[1].name,
        one[0].name,
        one[1].name,
        ident.name if ident is not None else None,
        fused.out_channels,
        fused.groups,
        fused.kernel,
    )


def custom_l2_penalty(k3: Any, centre: Any, k1: Any, t3: Any, t1: Any, identity: Any = None, tid: Any = None) -> Any:
    """RepVGGplus' custom L2 of one block, on the equivalent kernel, identity branch included
    (the official code leaves it out):

        L2 = (sum K3^2 - sum K3c^2) + sum (K3c t3 + K1 t1 + I tid)^2 / (t3^2 + t1^2 + I tid^2)

    K3c is the dense kernel's centre tap, I the identity kernel (1 on the identity taps) and each
    t = gamma / sqrt(var + eps), detached. Written with arithmetic and `.sum()` only, so every
    backend calls it on its own (differentiable) arrays, in its own layout, with the t's
    reshaped to broadcast over the output axis."""
    circle = (k3**2).sum() - (centre**2).sum()
    eq = centre * t3 + k1 * t1
    den = t3**2 + t1**2
    if identity is not None:
        eq = eq + identity * tid
        den = den + identity * tid**2
    return circle + (eq**2 / den).sum()
