"""Property tests of the generic fusion rule: for random `Rep` descriptions mixing every
primitive (non-square kernels, dilation, groups, stride, conv+BN, 1x1 -> PadBN -> kxk chains,
1x1 -> PadBN -> average pool -> BN, per-channel scale, identity, a BN after the sum, channel
concatenation), the float64 oracle of the deploy form equals the train form to 1e-10; and
descriptions that are not exactly one conv are refused, naming the branch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reparam_core import (
    BN,
    SE,
    Act,
    AvgPool,
    Block,
    Conv,
    FusionError,
    PadBN,
    Rep,
    Scale,
    block_kernel_bias,
    count_macs,
    count_params,
    reparameterize_state,
)
from reparam_core.blocks.nodes import to_deploy
from reparam_core.blocks.oracle import block_forward
from reparam_core.blocks.schema import schema_of
from reparam_core.weights.state import random_tensors

REL = 1e-10


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@st.composite
def rep_blocks(draw) -> tuple[Block, tuple[int, int], int]:
    g = draw(st.sampled_from([1, 2, 3]))
    cin = g * draw(st.integers(1, 3))
    square = draw(st.booleans())
    kh = draw(st.sampled_from([1, 3, 5]))
    kw = kh if square else draw(st.sampled_from([1, 3, 5]))
    d = draw(st.integers(1, 2)) if max(kh, kw) > 1 else 1
    s = draw(st.sampled_from([1, 1, 2]))
    extra = draw(st.sampled_from([0, 0, 1]))
    ph, pw = d * (kh - 1) // 2 + extra, d * (kw - 1) // 2 + extra
    identity_ok = extra == 0 and s == 1
    cout = cin if identity_ok or draw(st.booleans()) else g * draw(st.integers(1, 3))
    identity_ok = identity_ok and cout == cin
    geo = dict(stride=s, dilation=d, groups=g)
    kinds = ["kxk", "1x1", "asym", "scale"] + (["bn", "empty", "scale_only"] if identity_ok else [])
    if ph == pw:
        kinds.append("chain")
        if kh == kw and (d == 1 or kh == 1):
            kinds.append("avg")
    picked = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4))
    branches = []
    for i, kind in enumerate(picked):
        n = f"b{i}"
        bias = draw(st.booleans())
        if kind == "kxk":
            branches.append(
                (Conv(f"{n}.conv", cin, cout, (kh, kw), padding=(ph, pw), bias=bias, **geo), BN(f"{n}.bn", cout, 1e-3))
            )
        elif kind == "1x1":
            branches.append(
                (
                    Conv(
                        f"{n}.conv",
                        cin,
                        cout,
                        1,
                        padding=(ph - d * (kh - 1) // 2, pw - d * (kw - 1) // 2),
                        bias=bias,
                        **geo,
                    ),
                    BN(f"{n}.bn", cout),
                )
            )
        elif kind == "asym":  # ACNet: 1 x kw and kh x 1
            branches.append(
                (
                    Conv(f"{n}.conv", cin, cout, (1, kw), padding=(ph - d * (kh - 1) // 2, pw), bias=bias, **geo),
                    BN(f"{n}.bn", cout),
                )
            )
        elif kind == "scale":
            branches.append(
                (Conv(f"{n}.conv", cin, cout, (kh, kw), padding=(ph, pw), **geo), Scale(f"{n}.scale", cout))
            )
        elif kind == "bn":
            branches.append((BN(f"{n}", cout, 0.1),))
        elif kind == "empty":
            branches.append(())
        elif kind == "scale_only":
            branches.append((Scale(f"{n}", cout),))
        elif kind == "chain":  # DBB 1x1 -> BN-and-pad -> kxk
            mid = g * draw(st.integers(1, 2))
            branches.append(
                (
                    Conv(f"{n}.idconv1", cin, mid, 1, groups=g),
                    PadBN(f"{n}.bn1", mid, ph),
                    Conv(f"{n}.conv2", mid, cout, (kh, kw), stride=s, dilation=d, groups=g, bias=bias),
                    BN(f"{n}.bn2", cout),
                )
            )
        else:  # DBB 1x1 -> BN-and-pad -> average pool -> BN
            branches.append(
                (
                    Conv(f"{n}.conv", cin, cout, 1, groups=g),
                    PadBN(f"{n}.bn", cout, ph),
                    AvgPool(kh, s, 0),
                    BN(f"{n}.avgbn", cout),
                )
            )
    post_bn = BN("bn", cout) if draw(st.booleans()) else None
    rep = Rep(tuple(branches), Conv("fused", cin, cout, (kh, kw), padding=(ph, pw), **geo), post_bn)
    tail = draw(st.sampled_from([(), (Act("relu"),), (SE("se", cout, 2), Act("silu"))]))
    block = Block("", "TestBlock", (rep, *tail))
    lo_h, lo_w = max(1, d * (kh - 1) + 1 - 2 * ph), max(1, d * (kw - 1) + 1 - 2 * pw)
    return block, (draw(st.integers(lo_h, 9)), draw(st.integers(lo_w, 9))), draw(st.integers(0, 2**31 - 1))


@given(rep_blocks())
def test_random_rep_deploy_equals_train(cfg) -> None:
    block, (h, w), seed = cfg
    params = random_tensors(schema_of(block), seed, np.float64)
    deploy = reparameterize_state(block, params)
    assert list(deploy) == list(schema_of(to_deploy(block)))
    x = np.random.default_rng(seed).normal(size=(2, block.body[0].fused.in_channels, h, w))
    y_train = block_forward(block, params, x, "train")
    assert rel_err(block_forward(block, deploy, x, "deploy"), y_train) <= REL
    k, _ = block_kernel_bias(block, params)
    # the dtype of the Rep's own tensors; an identity-only Rep has none, and the fusion sees only
    # the Rep's tensors (the streaming converter): float32, as the core documents
    has_tensors = bool(schema_of(Block("", "RepOnly", block.body[:1])))
    assert k.dtype == (np.float64 if has_tensors else np.float32) and np.array_equal(k, deploy["fused.weight"])


@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([(1, 3), (3, 1), (3, 3)]), st.integers(0, 2**31 - 1))
def test_concat_rep_equals_channel_concat(c: int, o: int, k2: tuple[int, int], seed: int) -> None:
    pad2 = (1 - (3 - k2[0]) // 2, 1 - (3 - k2[1]) // 2)  # centred in the fused 3x3, padding 1
    rep = Rep(
        ((Conv("a", c, o, 1), BN("abn", o)), (Conv("b", c, o + 1, k2, padding=pad2), BN("bbn", o + 1))),
        Conv("fused", c, 2 * o + 1, 3, padding=1),
        combine="concat",
    )
    block = Block("", "ConcatBlock", (rep,))
    params = random_tensors(schema_of(block), seed, np.float64)
    x = np.random.default_rng(seed).normal(size=(1, c, 6, 5))
    want = block_forward(block, params, x, "train")
    assert want.shape[1] == 2 * o + 1
    assert rel_err(block_forward(block, reparameterize_state(block, params), x, "deploy"), want) <= REL


def test_counts_follow_the_description() -> None:
    rep = Rep(
        ((Conv("d.conv", 4, 8, 3, padding=1), BN("d.bn", 8)), (Conv("o.conv", 4, 8, 1), BN("o.bn", 8))),
        Conv("r", 4, 8, 3, padding=1),
    )
    block = Block("", "B", (rep, Act("relu")))
    # train: 8*4*9 + 8*4 conv weights + 2 * (2 * 8) learnable BN; deploy: 8*4*9 + 8 bias
    assert count_params(block, "train") == 288 + 32 + 32
    assert count_params(block, "deploy") == 288 + 8
    assert count_macs(block, "train", size=5) == 25 * (288 + 32)  # 3-channel input not used here


@pytest.mark.parametrize(
    "branch,match",
    [
        ((Conv("c", 4, 4, 1, padding=1), BN("b", 4)), "padding .* does not line up"),
        ((Conv("c", 4, 4, 3, padding=1, stride=2), BN("b", 4)), "stride"),
        ((Conv("c", 4, 4, 3, padding=1, groups=2), BN("b", 4)), "groups=2"),
        ((Conv("c", 4, 4, 3, padding=1, dilation=2), BN("b", 4)), "dilation"),
        ((Conv("c", 4, 4, 1), BN("b", 4), Conv("c2", 4, 4, 3, padding=1)), "biased value"),
        ((Conv("c", 4, 4, 1, bias=True), PadBN("b", 4, 1), Conv("c2", 4, 4, 3)), "bias-free"),
        ((Conv("c", 4, 4, 3, padding=1), Conv("c2", 4, 4, 1)), "only a 1x1"),
        ((Conv("c", 4, 4, 4, padding=1), BN("b", 4)), "cannot be centred"),
        ((BN("b", 5),), "5 channels"),
    ],
)
def test_rep_refuses_what_is_not_one_conv(branch, match: str) -> None:
    with pytest.raises(FusionError, match=match):
        Rep(((Conv("d", 4, 4, 3, padding=1), BN("e", 4)), branch), Conv("r", 4, 4, 3, padding=1))


def test_identity_branch_needs_same_shape() -> None:
    with pytest.raises(FusionError, match="identity branch needs"):
        Rep(((Conv("d", 4, 4, 3, padding=1, stride=2), BN("e", 4)), ()), Conv("r", 4, 4, 3, padding=1, stride=2))
