"""An independent reference for ACNet's ACBlock: the official train-form forward in eval mode,
written here in plain torch functional code from the official semantics (DingXiaoH/ACNet
acnet/acb.py ACBlock; `use_last_bn` from that file's earlier version), reading the checkpoint by
official key names and the official constructor arguments only.

The library's train and deploy forms must agree with it; deliberately mis-described copies (two
BNs swapped, a wrong epsilon) must not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from family_reference import (
    Checkpoint,
    Run,
    assert_forms_match,
    assert_mutant_caught,
    bn,
    conv,
    official_run,
    set_eps_all,
    swap_names,
)

from reparam_core import Block
from reparam_core.blocks.nodes import SpecLike

Tensor = torch.Tensor

# Measured max relative error (float32 library vs float64 reference) over every case below:
# train form 2.5e-7, deploy form 2.7e-7; tolerances about 10x.
TRAIN_TOL = 2.5e-6
DEPLOY_TOL = 3e-6
EPS = 1e-5  # every BN of the official block is built with torch's default


def acblock_reference(
    ck: Checkpoint,
    x: Tensor,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    use_last_bn: bool = False,
) -> Tensor:
    """ACBlock, k = kernel_size, p = padding >= k // 2, q = p - k // 2 (stride s, groups g):
    square_bn(conv_kxk(x; pad (p, p))) + ver_bn(conv_kx1(x; pad (p, q)))
    + hor_bn(conv_1xk(x; pad (q, p))), then last_bn with use_last_bn. (With p < k // 2 the
    official code crops the asymmetric branches' input instead; the registry refuses that.)"""
    assert padding >= kernel_size // 2 and x.shape[1] == in_channels
    q = padding - kernel_size // 2

    def branch(key: str, norm: str, pad: tuple[int, int]) -> Tensor:
        return bn(ck, norm, conv(ck, key, x, stride, pad, groups, bias=False), EPS)

    out = branch("square_conv", "square_bn", (padding, padding))
    out = out + branch("ver_conv", "ver_bn", (padding, q)) + branch("hor_conv", "hor_bn", (q, padding))
    assert out.shape[1] == out_channels
    return bn(ck, "last_bn", out, EPS) if use_last_bn else out


CASES: dict[str, dict[str, Any]] = {
    "k3-p1": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1),
    "k3-p1-s2-in!=out": dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1),
    "k3-p2-wider-padding": dict(in_channels=8, out_channels=8, kernel_size=3, padding=2),
    "k5-p2-g4": dict(in_channels=8, out_channels=16, kernel_size=5, padding=2, groups=4),
    "k5-p3-s2-g2": dict(in_channels=8, out_channels=12, kernel_size=5, stride=2, padding=3, groups=2),
    "k3-p1-last-bn": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, use_last_bn=True),
    "k5-p4-s2-depthwise-last-bn": dict(
        in_channels=8, out_channels=8, kernel_size=5, stride=2, padding=4, groups=8, use_last_bn=True
    ),
}


def _run(case: str) -> Run:
    """The registry's ACBlock for the case, a random official checkpoint, an input and the
    reference output."""
    return official_run("ACBlock", CASES[case], acblock_reference, seed=len(case))


@pytest.mark.parametrize("case", list(CASES))
def test_library_forms_match_the_reference(case: str) -> None:
    spec, ck, x, want = _run(case)
    assert_forms_match(spec, ck, x, want, TRAIN_TOL, DEPLOY_TOL)


# ----------------------------------------------------------------------------- mutations


BNS = ("square_bn", "ver_bn", "hor_bn", "last_bn")  # every BN of the official class


# case and mutation; the mutant's measured error against the reference in the comment
MUTANTS: dict[str, tuple[str, Callable[[SpecLike], Block]]] = {
    # 3.9e-1
    "ver-bn<->hor-bn": ("k3-p1", lambda s: swap_names(s, "ver_bn", "hor_bn")),
    # 3.1e-1
    "ver-bn<->hor-bn-grouped-s2": ("k5-p3-s2-g2", lambda s: swap_names(s, "ver_bn", "hor_bn")),
    # 1.8e-1
    "square-bn<->ver-bn": ("k3-p2-wider-padding", lambda s: swap_names(s, "square_bn", "ver_bn")),
    # 5.0e-1
    "square-bn<->last-bn": ("k3-p1-last-bn", lambda s: swap_names(s, "square_bn", "last_bn")),
    # 8.7e-4
    "eps-1e-3": ("k3-p1-s2-in!=out", lambda s: set_eps_all(s, BNS, 1e-3)),
    # 1.2e-3
    "eps-1e-3-last-bn": ("k5-p4-s2-depthwise-last-bn", lambda s: set_eps_all(s, BNS, 1e-3)),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_reference_rejects_a_mis_described_block(mutant: str) -> None:
    case, mutation = MUTANTS[mutant]
    spec, ck, x, want = _run(case)
    assert_mutant_caught(mutation(spec), spec, ck, x, want, TRAIN_TOL)
