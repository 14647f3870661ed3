"""The core refuses a branch that pads a biased value: a BN (or biased conv) before a padded conv
or pool, even when it is the branch's first conv (the graph passes meet such chains in user
models; fusing them would change the border pixels). The conv a sum of branches becomes covers
the largest dilated span of its branches."""

from __future__ import annotations

import pytest

from reparam_core import BN, AvgPool, Conv, FusionError, Rep
from reparam_core.blocks.graphfuse import fused_geometry


@pytest.mark.parametrize("stage", [Conv("c", 4, 4, 3, padding=1), AvgPool(3, 1, 1)])
def test_bn_before_a_padded_stage_is_refused(stage) -> None:
    with pytest.raises(FusionError, match="would pad a biased value with zeros"):
        Rep(((BN("bn", 4), stage),), Conv("f", 4, 4, 3, padding=1))


def test_bn_before_an_unpadded_stage_is_accepted() -> None:
    rep = Rep(((BN("bn", 4), Conv("c", 4, 4, 3)),), Conv("f", 4, 4, 3))
    assert rep.deploy_conv.bias


@pytest.mark.parametrize(
    ("branches", "kernel", "padding", "dilation"),
    [
        ([Conv("d", 4, 4, 3, padding=2, dilation=2), Conv("c", 4, 4, 3, padding=1)], (5, 5), (2, 2), (1, 1)),
        ([Conv("d", 4, 4, 3, padding=3, dilation=3), Conv("c", 4, 4, 5, padding=2)], (7, 7), (3, 3), (1, 1)),
        (
            [Conv("d", 4, 4, 3, padding=4, dilation=4), Conv("e", 4, 4, 3, padding=2, dilation=2)],
            (5, 5),
            (4, 4),
            (2, 2),
        ),
        ([Conv("d", 4, 4, (1, 3), padding=(0, 2), dilation=2), Conv("c", 4, 4, 3, padding=1)], (3, 5), (1, 2), (1, 1)),
    ],
)
def test_fused_geometry_covers_the_largest_dilated_span(branches, kernel, padding, dilation) -> None:
    """The span of k taps dilated by d is (k - 1) d + 1; the fused conv's dilation is the gcd of
    the branches' (its grid holds every tap), its kernel the largest span on that grid."""
    fused = fused_geometry([(c,) for c in branches], 4, 4)
    assert (fused.kernel, fused.padding, fused.dilation) == (kernel, padding, dilation)
    Rep(tuple((c,) for c in branches), fused)  # every branch lines up with it (check_rep)
