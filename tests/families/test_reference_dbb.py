"""An independent reference for DiverseBranchBlock: the official train-form forward in eval mode,
written here in plain torch functional code from the official semantics (DingXiaoH/
DiverseBranchBlock diversebranchblock.py: DiverseBranchBlock, IdentityBasedConv1x1,
BNAndPadLayer), reading the checkpoint by official key names and the official constructor
arguments only.

The library's train and deploy forms must agree with it; deliberately mis-described copies (two
BNs swapped, the depthwise average pool left out, BN-and-pad padding with zeros, the identity-
based 1x1 read as a plain conv) must not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from family_reference import (
    Checkpoint,
    Run,
    assert_forms_match,
    assert_mutant_caught,
    bn,
    conv,
    mutate,
    official_run,
    random_input,
    swap_names,
)

from reparam_core import Add, AvgPool, Block, Conv, PadBN, Rep
from reparam_core.blocks.nodes import Branch, Node, SpecLike

Tensor = torch.Tensor

# Measured max relative error (float32 library vs float64 reference) over every case below:
# train form 2.5e-7, deploy form 2.5e-7; tolerances about 10x.
TRAIN_TOL = 2.5e-6
DEPLOY_TOL = 2.5e-6
EPS = 1e-5  # every BN of the official block is built with torch's default


def identity_kernel(channels: int, groups: int) -> Tensor:
    """IdentityBasedConv1x1's fixed part: I[i, i mod (C / g), 0, 0] = 1, else 0."""
    ident = torch.zeros(channels, channels // groups, 1, 1, dtype=torch.float64)
    ident[torch.arange(channels), torch.arange(channels) % (channels // groups)] = 1.0
    return ident


def bn_and_pad(ck: Checkpoint, prefix: str, x: Tensor, pad: int) -> Tensor:
    """BNAndPadLayer: y = BN(x) (tensors at `prefix.bn`), then `pad` pixels on every side filled
    with BN(0) = beta - mean gamma / sqrt(var + eps), per channel."""
    y = bn(ck, f"{prefix}.bn", x, EPS)
    at_zero = bn(ck, f"{prefix}.bn", torch.zeros_like(x[:1, :, :1, :1]), EPS)
    return F.pad(y - at_zero, [pad] * 4) + at_zero


def dbb_reference(
    ck: Checkpoint,
    x: Tensor,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    internal_channels_1x1_3x3: int | None = None,
    nonlinear: torch.nn.Module | None = None,
) -> Tensor:
    """DiverseBranchBlock: nonlinear(origin + [1x1] + avg + 1x1_kxk), k = kernel_size, p = k // 2:
    origin  = BN(conv_k(x; s, p, g));
    1x1     = BN(conv_1(x; s, g)) when g < out;
    avg     = avgbn(avgpool_k,s,0(bn_and_pad_p(conv_1(x; g)))) when g < out,
              else avgbn(avgpool_k,s,p(x)) (zero padding counted);
    1x1_kxk = bn2(conv_k(bn_and_pad_p(conv_1(x; g)); s, 0, g)), the 1x1 weight + I when the
              internal width (in if g < out else 2 in, unless given) equals in (idconv1)."""
    k, s, g = kernel_size, stride, groups
    assert padding == k // 2 and x.shape[1] == in_channels
    out = bn(ck, "dbb_origin.bn", conv(ck, "dbb_origin.conv", x, s, padding, g, bias=False), EPS)
    if g < out_channels:
        out = out + bn(ck, "dbb_1x1.bn", conv(ck, "dbb_1x1.conv", x, s, 0, g, bias=False), EPS)
        avg = bn_and_pad(ck, "dbb_avg.bn", conv(ck, "dbb_avg.conv", x, 1, 0, g, bias=False), padding)
        avg = F.avg_pool2d(avg, k, s, 0)
    else:
        avg = F.avg_pool2d(x, k, s, padding, count_include_pad=True)
    out = out + bn(ck, "dbb_avg.avgbn", avg, EPS)
    internal = internal_channels_1x1_3x3 or (in_channels if g < out_channels else 2 * in_channels)
    if internal == in_channels:
        first = ck["dbb_1x1_kxk.idconv1.weight"] + identity_kernel(in_channels, g)
    else:
        first = ck["dbb_1x1_kxk.conv1.weight"]
    assert first.shape[0] == internal, "internal width is not the official one"
    mid = bn_and_pad(ck, "dbb_1x1_kxk.bn1", F.conv2d(x, first, None, 1, 0, 1, g), padding)
    out = out + bn(ck, "dbb_1x1_kxk.bn2", conv(ck, "dbb_1x1_kxk.conv2", mid, s, 0, g, bias=False), EPS)
    return out if nonlinear is None else nonlinear(out)


def _dbb(**kwargs: Any) -> dict[str, Any]:
    """A case: the official arguments, padding k // 2 (as the official asserts) unless given."""
    return {"padding": kwargs["kernel_size"] // 2, **kwargs}


CASES = {
    "k3-in!=out-idconv1": _dbb(in_channels=8, out_channels=16, kernel_size=3),
    "k3-g2-idconv1": _dbb(in_channels=8, out_channels=8, kernel_size=3, groups=2),
    "k5-s2-g4-in!=out": _dbb(in_channels=8, out_channels=16, kernel_size=5, stride=2, groups=4),
    "k3-conv1-internal16-relu": _dbb(
        in_channels=8, out_channels=16, kernel_size=3, internal_channels_1x1_3x3=16, nonlinear=torch.nn.ReLU()
    ),
    "depthwise-k3": _dbb(in_channels=8, out_channels=8, kernel_size=3, groups=8),
    "depthwise-k5-s2": _dbb(in_channels=8, out_channels=8, kernel_size=5, stride=2, groups=8),
    "depthwise-k3-idconv1": _dbb(in_channels=8, out_channels=8, kernel_size=3, groups=8, internal_channels_1x1_3x3=8),
}


def _run(case: str) -> Run:
    """The registry's DiverseBranchBlock for the case, a random official checkpoint, an input and
    the reference output."""
    return official_run("DiverseBranchBlock", CASES[case], dbb_reference, seed=len(case))


@pytest.mark.parametrize("case", list(CASES))
def test_library_forms_match_the_reference(case: str) -> None:
    spec, ck, x, want = _run(case)
    assert_forms_match(spec, ck, x, want, TRAIN_TOL, DEPLOY_TOL)


def test_identity_kernel_is_the_identity_of_each_group() -> None:
    """The 1x1 conv with I and groups g maps x to x (the reference's idconv1 at zero weight)."""
    x = random_input(8)
    for g in (1, 2, 8):
        torch.testing.assert_close(F.conv2d(x, identity_kernel(8, g), groups=g), x, rtol=0, atol=0)


# ----------------------------------------------------------------------------- mutations


def _on_branches(change: Callable[[Branch], Branch]) -> Callable[[SpecLike], Block]:
    """A mutation applying `change` to every branch of the block's Rep."""

    def fn(node: Node) -> Node:
        if isinstance(node, Rep):
            return replace(node, branches=tuple(change(b) for b in node.branches))
        return node

    return lambda spec: mutate(spec, fn)


def _pool_left_out(branch: Branch) -> Branch:
    """The branch without its average pool (no tensors): depthwise, dbb_avg becomes avgbn(x)."""
    return tuple(n for n in branch if not isinstance(n, AvgPool))


def _zero_padded(spec: SpecLike) -> Block:
    """BN-and-pad as BN then zero padding (moved into the pool or conv after it, counted by the
    pool): the border reads 0 instead of BN(0). Not fusable, so described as a plain sum (`Add`),
    which the train form runs all the same."""

    def change(node: Node) -> Node:
        if isinstance(node, PadBN):
            return replace(node, pad=0)
        if isinstance(node, AvgPool) and node.padding == 0:
            return replace(node, padding=node.kernel // 2)
        if isinstance(node, Conv) and node.name == "dbb_1x1_kxk.conv2":
            return replace(node, padding=node.kernel[0] // 2)
        return node

    def fn(node: Node) -> Node:
        if isinstance(node, Rep):
            return Add(tuple(tuple(change(n) for n in b) for b in node.branches))
        return node

    return mutate(spec, fn)


def _plain_idconv(branch: Branch) -> Branch:
    """The identity-based 1x1 read as a plain conv (its identity part forgotten)."""
    return tuple(replace(n, plus_identity=False) if isinstance(n, Conv) else n for n in branch)


# case and mutation; the mutant's measured error against the reference in the comment
MUTANTS: dict[str, tuple[str, Callable[[SpecLike], Block]]] = {
    # 4.7e-1
    "origin-bn<->1x1-bn": ("k3-in!=out-idconv1", lambda s: swap_names(s, "dbb_origin.bn", "dbb_1x1.bn")),
    # 5.0e-1
    "origin-bn<->1x1_kxk-bn2": ("k5-s2-g4-in!=out", lambda s: swap_names(s, "dbb_origin.bn", "dbb_1x1_kxk.bn2")),
    # 4.8e-1
    "depthwise-avg-pool-left-out": ("depthwise-k3", _on_branches(_pool_left_out)),
    # 1.7e-1
    "bn-and-pad-pads-zeros": ("k3-conv1-internal16-relu", _zero_padded),
    # 3.6e-1
    "idconv1-as-plain-conv": ("k3-g2-idconv1", _on_branches(_plain_idconv)),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_reference_rejects_a_mis_described_block(mutant: str) -> None:
    case, mutation = MUTANTS[mutant]
    spec, ck, x, want = _run(case)
    assert_mutant_caught(mutation(spec), spec, ck, x, want, TRAIN_TOL)
