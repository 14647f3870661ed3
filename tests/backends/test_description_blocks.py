"""Blocks known only as descriptions (no family, no spec class) in every backend, MegEngine
included: the description crosses to the MegEngine worker as JSON (reparam_core.blocks.nodes_io), so
any family's or official class's block runs there with no registration."""

from __future__ import annotations

import numpy as np
import pytest
from backend_adapters import BACKENDS, Target, check_outcome

from parity_tests.tolerance import BLOCK_REL
from reparam_core import BN, Act, AvgPool, Block, Conv, PadBN, Rep, random_tensors, reparameterize_state, schema_of
from reparam_core.blocks.oracle import block_forward

DESCRIPTIONS = {
    # ACNet-like, grouped and dilated: 3x3, 1x3 and 3x1 conv+BN branches
    "asymmetric-g2-d2": Block(
        "",
        "AsymmetricDilated",
        (
            Rep(
                (
                    (Conv("sq.conv", 4, 8, 3, padding=2, dilation=2, groups=2), BN("sq.bn", 8)),
                    (Conv("h.conv", 4, 8, (1, 3), padding=(0, 2), dilation=2, groups=2), BN("h.bn", 8)),
                    (Conv("v.conv", 4, 8, (3, 1), padding=(2, 0), dilation=2, groups=2), BN("v.bn", 8)),
                ),
                Conv("fused", 4, 8, 3, padding=2, dilation=2, groups=2),
            ),
            Act("relu"),
        ),
    ),
    # DBB-like chains with a BN after the sum, stride 2
    "chains-bn-after-sum-s2": Block(
        "",
        "ChainsPostBN",
        (
            Rep(
                (
                    (Conv("k.conv", 6, 6, 3, stride=2, padding=1), BN("k.bn", 6)),
                    (Conv("c.a", 6, 4, 1), PadBN("c.pad", 4, 1), Conv("c.b", 4, 6, 3, stride=2)),
                    (Conv("p.a", 6, 6, 1), PadBN("p.pad", 6, 1), AvgPool(3, 2), BN("p.bn", 6)),
                ),
                Conv("fused", 6, 6, 3, stride=2, padding=1),
                bn=BN("post", 6),
            ),
            Act("silu"),
        ),
    ),
    # UniRepLKNet's DilatedReparamBlock: a depthwise 7x7 conv + BN and 5x5 d1, 3x3 d2, 3x3 d3
    # conv + BN branches (effective 5, 5, 7), each dilated into the fused 7x7
    "unireplknet-dilated-dw": Block(
        "",
        "DilatedReparam",
        (
            Rep(
                tuple(
                    (
                        Conv(f"k{k}d{d}.conv", 6, 6, k, padding=d * (k - 1) // 2, dilation=d, groups=6),
                        BN(f"k{k}d{d}.bn", 6),
                    )
                    for k, d in ((7, 1), (5, 1), (3, 2), (3, 3))
                ),
                Conv("lk", 6, 6, 7, padding=3, groups=6),
            ),
            Act("silu"),
        ),
    ),
    # a dilation-2 fused conv (grouped, 8 -> 8): 5x5 d2 and 3x3 d4 conv + BN branches, a 1x1 ->
    # BN-and-pad -> 3x3 d4 chain, an identity BN, and a BN after the sum
    "dilated-on-d2-grid-g2": Block(
        "",
        "DilatedGrid",
        (
            Rep(
                (
                    (Conv("a.conv", 4, 4, 5, padding=4, dilation=2, groups=2), BN("a.bn", 4)),
                    (Conv("b.conv", 4, 4, 3, padding=4, dilation=4, groups=2), BN("b.bn", 4)),
                    (
                        Conv("c.pw", 4, 6, 1, groups=2),
                        PadBN("c.pad", 6, 4),
                        Conv("c.conv", 6, 4, 3, dilation=4, groups=2),
                    ),
                    (BN("id", 4),),
                ),
                Conv("fused", 4, 4, 5, padding=4, dilation=2, groups=2),
                bn=BN("post", 4),
            ),
            Act("relu"),
        ),
    ),
}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", list(DESCRIPTIONS))
def test_description_block_in_every_backend(backend, name):
    desc = DESCRIPTIONS[name]
    params = random_tensors(schema_of(desc), seed=3)
    cin = next(n for n in desc.body[0].branches[0] if isinstance(n, Conv)).in_channels
    x = np.random.default_rng(5).standard_normal((2, cin, 9, 11)).astype(np.float32)
    expected = block_forward(desc, params, x, "train")
    out = backend.run(Target(desc), params, x, reparameterize_state(desc, params))
    check_outcome(out, desc, params, reparameterize_state(desc, params), expected, BLOCK_REL)
