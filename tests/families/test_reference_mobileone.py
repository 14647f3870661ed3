"""An independent reference for MobileOne (apple/ml-mobileone): the official train-form forward,
in eval mode, of `MobileOneBlock` (and its `inference_mode=True` deploy-only form) and of the
`MobileOne` model, written in plain torch functional code from the official semantics and
reading an official-style checkpoint by its official key names only. The library's torch train
and deploy forms must agree with it; copies of the library's description mis-described on
purpose (two BNs swapped between branches, the skip BN's epsilon changed) must not.

Official facts used (read from the source, not from the library):
- MobileOneBlock: relu(se(rbr_skip(x) + rbr_scale(x) + sum_i rbr_conv[i](x))), where rbr_skip
  is an nn.BatchNorm2d on the input, present only when in == out and stride == 1; rbr_scale is
  a 1x1 conv (padding 0) + BN, present only when kernel_size > 1; rbr_conv[i] (i <
  num_conv_branches) a kxk conv with the given padding + BN; every conv without bias, with the
  block's stride and groups; every BN with the default eps 1e-5. Inference mode: one conv
  `reparam_conv` with bias, then se, then relu.
- SEBlock: x * sigmoid(expand(relu(reduce(mean_HW(x))))), reduce/expand 1x1 convs with bias,
  hidden int(C * 0.0625).
- MobileOne: stage0 = block(3, min(64, int(64 w0)), 3, stride 2, padding 1) with one conv
  branch and no SE; stage i of num_blocks[i] (2, 8, 10, 1) pairs: a depthwise block (in, in, 3,
  stride 2 for the first pair else 1, padding 1, groups in) then a pointwise block (in,
  int(base_i w_i), 1, padding 0), both with the model's num_conv_branches and SE in the last
  int(n / 2) pairs of stage3 and all pairs of stage4 when use_se; mean over H, W; `linear`.
  S0: widths (0.75, 1, 1, 2), num_conv_branches 4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from family_reference import (
    Checkpoint,
    assert_forms_match,
    assert_mutant_caught,
    block_prefix,
    bn,
    conv,
    model_run,
    official_run,
    set_eps,
    swap_names,
    trained_like,
)

from reparam_core.blocks.nodes import Block
from reparam_core.families import mobileone

EPS = 1e-5  # nn.BatchNorm2d's default; the official code passes no other

# Measured (float32 library forms against this float64 reference, max over CASES and the
# mutation tests' checkpoints): train form 3.2e-7, deploy form 3.3e-7 of the output's largest
# magnitude.
TRAIN_TOL = 3e-6
DEPLOY_TOL = 3e-6
# Measured on MobileOne-S0 (43 blocks, one 32x32 input): train 9.9e-7, deploy 1.3e-6.
MODEL_TOL = 1.3e-5


# ----------------------------------------------------------------------------- the reference


def se_block(ck: Checkpoint, x: torch.Tensor) -> torch.Tensor:
    """SEBlock `se`: x * sigmoid(expand(relu(reduce(mean_HW(x)))))."""
    s = F.relu(conv(ck, "se.reduce", x.mean(dim=(2, 3), keepdim=True), bias=True))
    return x * torch.sigmoid(conv(ck, "se.expand", s, bias=True))


def conv_bn(ck: Checkpoint, name: str, x: torch.Tensor, stride: int, padding: int, groups: int) -> torch.Tensor:
    """`name`.bn(conv(x; `name`.conv, no bias))."""
    return bn(ck, f"{name}.bn", conv(ck, f"{name}.conv", x, stride, padding, groups, bias=False), EPS)


def train_branches(
    ck: Checkpoint, x: torch.Tensor, skip: bool, scale: bool, n: int, stride: int, padding: int, groups: int
) -> torch.Tensor:
    """[rbr_skip(x)] + [rbr_scale(x), 1x1 padding 0] + sum_{i<n} rbr_conv.i(x)."""
    terms = [conv_bn(ck, f"rbr_conv.{i}", x, stride, padding, groups) for i in range(n)]
    if scale:
        terms.append(conv_bn(ck, "rbr_scale", x, stride, 0, groups))
    if skip:
        terms.append(bn(ck, "rbr_skip", x, EPS))
    return torch.stack(terms).sum(dim=0)


def mobileone_block(
    ck: Checkpoint,
    x: torch.Tensor,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    inference_mode: bool = False,
    use_se: bool = False,
    num_conv_branches: int = 1,
) -> torch.Tensor:
    """MobileOneBlock: relu(se?(train_branches)) or, in inference mode, relu(se?(reparam_conv(x)))."""
    if inference_mode:
        y = conv(ck, "reparam_conv", x, stride, padding, groups, bias=True)
    else:
        skip = in_channels == out_channels and stride == 1
        y = train_branches(ck, x, skip, kernel_size > 1, num_conv_branches, stride, padding, groups)
    return F.relu(se_block(ck, y) if use_se else y)


def mobileone_stage(
    ck: Checkpoint, x: torch.Tensor, stage: int, cin: int, planes: int, n: int, n_se: int, branches: int
) -> torch.Tensor:
    """Stage `stage`: n pairs (depthwise 3x3, stride 2 first; pointwise 1x1 to `planes`), SE in
    the last n_se pairs."""
    for j in range(n):
        se = j >= n - n_se
        dw = block_prefix(ck, f"stage{stage}.{2 * j}")
        x = mobileone_block(dw, x, cin, cin, 3, 2 if j == 0 else 1, 1, cin, False, se, branches)
        pw = block_prefix(ck, f"stage{stage}.{2 * j + 1}")
        x = mobileone_block(pw, x, cin, planes, 1, 1, 0, 1, False, se, branches)
        cin = planes
    return x


def mobileone_model(
    ck: Checkpoint, x: torch.Tensor, widths: tuple[float, ...], num_conv_branches: int = 1, use_se: bool = False
) -> torch.Tensor:
    """MobileOne: stage0 (3 -> min(64, int(64 w0)), stride 2), stages of (2, 8, 10, 1) pairs to
    int(base_i w_i) channels, mean over H, W, linear."""
    cin = min(64, int(64 * widths[0]))
    x = mobileone_block(block_prefix(ck, "stage0"), x, 3, cin, 3, stride=2, padding=1)
    for i, (n, base, w) in enumerate(zip((2, 8, 10, 1), (64, 128, 256, 512), widths)):
        n_se = (n // 2 if i == 2 else n if i == 3 else 0) if use_se else 0
        x = mobileone_stage(ck, x, i + 1, cin, int(base * w), n, n_se, num_conv_branches)
        cin = int(base * w)
    return F.linear(x.mean(dim=(2, 3)), ck["linear.weight"], ck["linear.bias"])


# ----------------------------------------------------------------------------- the cases

CLS = "MobileOneBlock"

# Official constructor arguments: kernel 1, 3 and 5; the skip BN present (in == out, stride 1)
# and absent (in != out; stride 2); 1 to 4 conv branches; SE (16 channels or more: hidden >= 1);
# grouped and depthwise; the deploy-only inference mode.
CASES: list[dict[str, Any]] = [
    dict(in_channels=16, out_channels=16, kernel_size=3, padding=1),
    dict(in_channels=16, out_channels=16, kernel_size=3, padding=1, num_conv_branches=3),
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, num_conv_branches=2),
    dict(in_channels=16, out_channels=16, kernel_size=3, stride=2, padding=1, num_conv_branches=2),
    dict(in_channels=16, out_channels=16, kernel_size=3, padding=1, groups=16, num_conv_branches=4),
    dict(in_channels=16, out_channels=16, kernel_size=3, stride=2, padding=1, groups=16),
    dict(in_channels=16, out_channels=32, kernel_size=3, padding=1, groups=4),
    dict(in_channels=32, out_channels=32, kernel_size=3, padding=1, use_se=True, num_conv_branches=2),
    dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=1, use_se=True),
    dict(in_channels=16, out_channels=16, kernel_size=1),
    dict(in_channels=16, out_channels=16, kernel_size=1, num_conv_branches=2, use_se=True),
    dict(in_channels=16, out_channels=32, kernel_size=1, num_conv_branches=4),
    dict(in_channels=8, out_channels=8, kernel_size=5, padding=2, num_conv_branches=2),
    dict(in_channels=16, out_channels=16, kernel_size=3, padding=1, inference_mode=True, use_se=True),
    dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=1, groups=2, inference_mode=True),
]


def case_id(kw: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items())


def test_the_official_class_is_the_only_one() -> None:
    assert set(mobileone.OFFICIAL) == {CLS}


@pytest.mark.parametrize("kwargs", CASES, ids=[case_id(c) for c in CASES])
def test_library_train_and_deploy_forms_match_the_reference(kwargs: dict[str, Any]) -> None:
    spec, ck, x, ref = official_run(CLS, kwargs, mobileone_block, 0)
    assert_forms_match(spec, ck, x, ref, TRAIN_TOL, DEPLOY_TOL)


def test_s0_model_matches_the_reference() -> None:
    spec, ck, x, ref = model_run("MobileOne-S0", mobileone_model, widths=(0.75, 1.0, 1.0, 2.0), num_conv_branches=4)
    assert_forms_match(spec, ck, x, ref, MODEL_TOL, MODEL_TOL)


# ----------------------------------------------------------------------------- mutations

MULTI = dict(in_channels=16, out_channels=16, kernel_size=3, padding=1, num_conv_branches=2)

# (label, constructor arguments, the mis-described copy of the block's description)
MUTANTS: list[tuple[str, dict[str, Any], Callable[[Any], Block]]] = [
    ("conv-branch-bns-swapped", MULTI, lambda s: swap_names(s, "rbr_conv.0.bn", "rbr_conv.1.bn")),
    ("scale-and-conv-bns-swapped", MULTI, lambda s: swap_names(s, "rbr_scale.bn", "rbr_conv.0.bn")),
    ("skip-and-conv-bns-swapped", MULTI, lambda s: swap_names(s, "rbr_skip", "rbr_conv.1.bn")),
    ("skip-bn-eps-1e-3", MULTI, lambda s: set_eps(s, "rbr_skip", 1e-3)),
    (
        "conv-bn-eps-1e-3",
        dict(in_channels=16, out_channels=16, kernel_size=1),
        lambda s: set_eps(s, "rbr_conv.0.bn", 1e-3),
    ),
]


@pytest.mark.parametrize("label,kwargs,mutation", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_reference_rejects_a_mis_described_copy(
    label: str, kwargs: dict[str, Any], mutation: Callable[[Any], Block]
) -> None:
    spec, ck, x, ref = official_run(CLS, kwargs, mobileone_block, 0, trained_like)
    # measured mutant errors: conv BNs swapped 0.43, scale and conv BNs 0.50, skip and conv BNs
    # 0.43, eps 1e-3 on rbr_skip 3.2e-2, on rbr_conv.0.bn 8.1e-2
    assert_mutant_caught(mutation(spec), spec, ck, x, ref, TRAIN_TOL)
