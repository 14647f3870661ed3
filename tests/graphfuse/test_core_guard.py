"""The core refuses a branch that pads a biased value: a BN (or biased conv) before a padded conv
or pool, even when it is the branch's first conv (the graph passes meet such chains in user
models; fusing them would change the border pixels)."""

from __future__ import annotations

import pytest

from reparam_core import BN, AvgPool, Conv, FusionError, Rep


@pytest.mark.parametrize("stage", [Conv("c", 4, 4, 3, padding=1), AvgPool(3, 1, 1)])
def test_bn_before_a_padded_stage_is_refused(stage) -> None:
    with pytest.raises(FusionError, match="would pad a biased value with zeros"):
        Rep(((BN("bn", 4), stage),), Conv("f", 4, 4, 3, padding=1))


def test_bn_before_an_unpadded_stage_is_accepted() -> None:
    rep = Rep(((BN("bn", 4), Conv("c", 4, 4, 3)),), Conv("f", 4, 4, 3))
    assert rep.deploy_conv.bias
