"""Rep descriptions whose branches have different dilations (UniRepLKNet's dilated re-param): a
branch conv with dilation r D (D the fused conv's) is dilated by r and centred in the fused kernel.
Property test: random such Reps (grouped, depthwise, stride 2, non-square dilations, conv+BN,
conv+scale, 1x1 -> PadBN -> dilated kxk chains, identity, a BN after the sum) in deploy form equal
the float64 oracle of the train form, which runs every branch conv with its own dilation, to 1e-10;
and what does not lie on the fused grid is refused, saying why."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reparam_core import BN, Act, Block, Conv, FusionError, PadBN, Rep, Scale, reparameterize_state
from reparam_core.blocks import fuse
from reparam_core.blocks.nodes import to_deploy
from reparam_core.blocks.oracle import block_forward
from reparam_core.blocks.schema import schema_of
from reparam_core.weights.state import random_tensors

REL = 1e-10


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def deploy_error(block: Block, hw: tuple[int, int], seed: int) -> float:
    """max |deploy - train| / max |train| of the float64 oracle on a random input."""
    params = random_tensors(schema_of(block), seed, np.float64)
    deploy = reparameterize_state(block, params)
    assert list(deploy) == list(schema_of(to_deploy(block)))
    x = np.random.default_rng(seed).normal(size=(2, block.body[0].fused.in_channels, *hw))
    return rel_err(block_forward(block, deploy, x, "deploy"), block_forward(block, params, x, "train"))


@st.composite
def dilated_reps(draw) -> tuple[Block, tuple[int, int], int]:
    g = draw(st.sampled_from([1, 2, 3, 0]))  # 0 = depthwise
    cin = draw(st.integers(1, 6)) if g == 0 else g * draw(st.integers(1, 2))
    g = g or cin
    big = draw(st.sampled_from([3, 5, 7, 9]))
    fd = draw(st.sampled_from([1, 1, 2]))
    stride = draw(st.sampled_from([1, 1, 2]))
    extra = draw(st.sampled_from([0, 0, 1]))
    pad = fd * (big - 1) // 2 + extra
    identity_ok = stride == 1 and extra == 0
    cout = cin if identity_ok or draw(st.booleans()) else g * draw(st.integers(1, 2))
    identity_ok = identity_ok and cout == cin
    # (k, r_h, r_w): a k x k kernel dilated r times the fused conv's, spanning <= big, centrable
    fits = [
        (k, rh, rw)
        for k in (1, 3, 5)
        for rh in (1, 2, 3)
        for rw in (1, 2, 3)
        if all((k - 1) * r + 1 <= big and (big - (k - 1) * r - 1) % 2 == 0 for r in (rh, rw))
        and (k > 1 or rh == rw == 1)
    ]
    kinds = ["bn", "scale", "chain"] + (["identity"] if identity_ok else [])
    branches = []
    for i in range(draw(st.integers(1, 4))):
        n = f"b{i}"
        k, rh, rw = draw(st.sampled_from(fits))
        span = ((k - 1) * rh + 1, (k - 1) * rw + 1)
        bpad = (pad - fd * (big - span[0]) // 2, pad - fd * (big - span[1]) // 2)
        conv = dict(stride=stride, dilation=(rh * fd, rw * fd), groups=g)
        kind = draw(st.sampled_from(kinds))
        if kind == "chain" and bpad[0] != bpad[1]:
            kind = "bn"  # a PadBN pads both axes alike
        if kind == "bn":
            branches.append(
                (Conv(f"{n}.conv", cin, cout, k, padding=bpad, bias=draw(st.booleans()), **conv), BN(f"{n}.bn", cout))
            )
        elif kind == "scale":
            branches.append((Conv(f"{n}.conv", cin, cout, k, padding=bpad, **conv), Scale(f"{n}.scale", cout)))
        elif kind == "chain":  # DBB 1x1 -> BN-and-pad -> dilated kxk (not row-separable)
            mid = g * draw(st.integers(1, 2))
            branches.append(
                (
                    Conv(f"{n}.pw", cin, mid, 1, groups=g),
                    PadBN(f"{n}.pad", mid, bpad[0]),
                    Conv(f"{n}.conv", mid, cout, k, bias=draw(st.booleans()), **conv),
                    BN(f"{n}.bn", cout),
                )
            )
        else:
            branches.append((BN(n, cout),))
    post = BN("post", cout) if draw(st.booleans()) else None
    rep = Rep(tuple(branches), Conv("fused", cin, cout, big, stride, pad, fd, g), post)
    low = max(1, fd * (big - 1) + 1 - 2 * pad)
    hw = (draw(st.integers(low, low + 8)), draw(st.integers(low, low + 8)))
    return Block("", "DilatedRep", (rep, Act("relu"))), hw, draw(st.integers(0, 2**31 - 1))


@given(dilated_reps())
def test_dilated_branches_fuse_exactly(cfg) -> None:
    block, hw, seed = cfg
    assert deploy_error(block, hw, seed) <= REL


def unireplknet(c: int, groups: int) -> Block:
    """UniRepLKNet's DilatedReparamBlock (kernel 7): the 7x7 conv + BN, and 5x5 d1, 3x3 d2, 3x3 d3
    conv + BN branches (effective sizes 5, 5, 7), depthwise in the original."""
    spec = ((7, 1), (5, 1), (3, 2), (3, 3))
    return Block(
        "",
        "DilatedReparamBlock",
        (
            Rep(
                tuple(
                    (
                        Conv(f"k{k}d{d}", c, c, k, padding=d * (k - 1) // 2, dilation=d, groups=groups),
                        BN(f"bn{k}{d}", c),
                    )
                    for k, d in spec
                ),
                Conv("lk", c, c, 7, padding=3, groups=groups),
            ),
        ),
    )


@pytest.mark.parametrize("groups", [1, 6])
def test_unireplknet_block_fuses_to_one_7x7(groups: int, monkeypatch: pytest.MonkeyPatch) -> None:
    block = unireplknet(6, groups)
    assert deploy_error(block, (9, 11), 4) <= REL
    monkeypatch.setattr(fuse, "CHUNK_ELEMENTS", 8)  # fused a few rows at a time, on the thread pool
    assert deploy_error(block, (9, 11), 5) <= REL


def test_a_dilated_branch_lands_on_its_taps_only() -> None:
    """A lone 3x3 d3 conv + BN fused into 7x7: nonzero taps at rows and columns 0, 3, 6 only,
    equal to the BN-scaled 3x3 weights."""
    block = Block(
        "", "B", (Rep(((Conv("c", 2, 2, 3, padding=3, dilation=3), BN("bn", 2)),), Conv("f", 2, 2, 7, padding=3)),)
    )
    params = random_tensors(schema_of(block), 1, np.float64)
    k = reparameterize_state(block, params)["f.weight"]
    t = params["bn.weight"] / np.sqrt(params["bn.running_var"] + 1e-5)
    assert np.array_equal(k[:, :, ::3, ::3], params["c.weight"] * t.reshape(-1, 1, 1, 1))
    mask = np.ones((7, 7), bool)
    mask[::3, ::3] = False
    assert not k[:, :, mask].any()


def test_dilated_branches_concatenate() -> None:
    rep = Rep(
        (
            (Conv("a", 3, 2, 3, padding=2, dilation=2), BN("abn", 2)),
            (Conv("b", 3, 4, 5, padding=2), BN("bbn", 4)),
        ),
        Conv("fused", 3, 6, 5, padding=2),
        combine="concat",
    )
    assert deploy_error(Block("", "C", (rep,)), (7, 6), 2) <= REL


@pytest.mark.parametrize(
    "branch,fused,match",
    [
        # 3x3 d2 spans 5: not in a 3x3 conv (the UniRepLKNet rule: effective size <= the large kernel)
        (Conv("c", 4, 4, 3, padding=2, dilation=2), Conv("f", 4, 4, 3, padding=1), r"spans 5x5\) cannot be centred"),
        (Conv("c", 4, 4, 3, padding=4, dilation=4), Conv("f", 4, 4, 7, padding=3), r"spans 9x9\) cannot be centred"),
        # d3 taps are not on a d2 grid
        (Conv("c", 4, 4, 3, padding=3, dilation=3), Conv("f", 4, 4, 5, padding=4, dilation=2), "not a multiple of it"),
        # d1 taps are not on a d2 grid either (a 3x3 d1 is not a 2x2 of the d2 conv)
        (Conv("c", 4, 4, 3, padding=1), Conv("f", 4, 4, 5, padding=4, dilation=2), r"dilation \(1, 1\) differs"),
        # right span, wrong padding: 3x3 d2 spans 5, centred in 7x7 padding 3 it needs padding 2
        (Conv("c", 4, 4, 3, padding=1, dilation=2), Conv("f", 4, 4, 7, padding=3), "must be 2 on axis 0"),
        # per axis: 3x3 with dilation (1, 2) spans 3x5, centred in 5x5 padding 2 it needs padding (1, 2)
        (Conv("c", 4, 4, 3, padding=2, dilation=(1, 2)), Conv("f", 4, 4, 5, padding=2), "must be 1 on axis 0"),
    ],
)
def test_misaligned_dilated_branches_are_refused(branch: Conv, fused: Conv, match: str) -> None:
    with pytest.raises(FusionError, match=match):
        Rep(((branch, BN("b", 4)),), fused)


def test_non_square_dilation_lines_up_per_axis() -> None:
    """3x3 with dilation (1, 2) spans 3x5: centred in 5x5 with padding (1, 2)."""
    rep = Rep(
        (
            (Conv("c", 4, 4, 3, padding=(1, 2), dilation=(1, 2)), BN("b", 4)),
            (Conv("d", 4, 4, 5, padding=2), BN("e", 4)),
        ),
        Conv("f", 4, 4, 5, padding=2),
    )
    assert deploy_error(Block("", "B", (rep,)), (6, 8), 3) <= REL
