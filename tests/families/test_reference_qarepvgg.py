"""An independent reference for the QARepVGG family: the official train-form forward, in eval
mode, of cxxgtxy/QARepVGG's `QARepVGGBlockV2` and its `RepVGG(block_cls=QARepVGGBlockV2)` model,
and of meituan/YOLOv6's `QARepVGGBlock` / `QARepVGGBlockV2`, written in plain torch functional
code from the official semantics and reading an official-style checkpoint by its official key
names only. The library's torch train and deploy forms must agree with it; copies of the
library's description mis-described on purpose (the raw identity or YOLOv6's average pool
dropped, two BNs swapped, a BN's epsilon changed) must not.

Official facts used (read from the sources, not from the library):
- every block: act(bn(rbr_dense.bn(conv3x3(x)) + conv1x1(x) [+ x] [+ avgpool3x3(x)])), the
  3x3 with padding 1, the 1x1 (`rbr_1x1`, a bare conv without bias) with padding 0, both with
  the block's stride and groups; the raw identity (nn.Identity) only when in == out and
  stride == 1; every BN an nn.BatchNorm2d with its default eps 1e-5.
- YOLOv6's QARepVGGBlockV2 adds `rbr_avg` = nn.AvgPool2d(3, 1, 1) (zero padding counted, the
  torch default) under the same condition as the identity; YOLOv6's act is ReLU; its deploy
  form keeps `bn` after `rbr_reparam` (the same function).
- cxxgtxy's act is an nn.Module instance, or a class that the block instantiates (default ReLU).
- the model: stem `stage0` = block(3, min(64, int(64 w0)), stride 2), `stage1..4` of
  num_blocks[i] blocks of int(base_i w_i) channels (base 64, 128, 256, 512), the first of each
  stage with stride 2, groups 1; global average pool; `linear`. A0: num_blocks (2, 4, 14, 1),
  widths (0.75, 0.75, 0.75, 2.5).
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
    drop_branches,
    model_run,
    official_run,
    set_eps,
    swap_names,
    trained_like,
)

from reparam_core import AvgPool
from reparam_core.blocks.nodes import Block, Branch
from reparam_core.families import qarepvgg

EPS = 1e-5  # nn.BatchNorm2d's default; no official QARepVGG class passes another

# Measured (float32 library forms against this float64 reference, max over CASES and the
# mutation tests' checkpoints): train form 4.3e-7, deploy form 3.8e-7 of the output's largest
# magnitude.
TRAIN_TOL = 4e-6
DEPLOY_TOL = 4e-6
# Measured on QARepVGG-A0 (22 blocks, one 32x32 input): train 7.9e-7, deploy 8.8e-7.
MODEL_TOL = 1e-5


# ----------------------------------------------------------------------------- the reference


def branch_sum(ck: Checkpoint, x: torch.Tensor, stride: int, groups: int, identity: bool) -> torch.Tensor:
    """rbr_dense.bn(conv3x3_s(x; rbr_dense.conv, padding 1)) + conv1x1_s(x; rbr_1x1) [+ x]."""
    dense = conv(ck, "rbr_dense.conv", x, stride, 1, groups, bias=False)
    out = bn(ck, "rbr_dense.bn", dense, EPS) + conv(ck, "rbr_1x1", x, stride, 0, groups, bias=False)
    return out + x if identity else out


def has_identity(in_channels: int, out_channels: int, stride: int) -> bool:
    """The official rule for the raw identity (and YOLOv6's rbr_avg): in == out and stride 1."""
    return in_channels == out_channels and stride == 1


def qarepvgg_block_v2(
    ck: Checkpoint,
    x: torch.Tensor,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    act: Any = torch.nn.ReLU,
) -> torch.Tensor:
    """cxxgtxy QARepVGGBlockV2: act(bn(branch_sum)); `act` a module, or a class instantiated."""
    assert kernel_size == 3 and padding == 1  # the official class asserts both
    nonlinearity = act() if isinstance(act, type) else act
    y = branch_sum(ck, x, stride, groups, has_identity(in_channels, out_channels, stride))
    return nonlinearity(bn(ck, "bn", y, EPS))


def yolov6_block(avg_pool: bool) -> Callable[..., torch.Tensor]:
    """YOLOv6's QARepVGGBlock (avg_pool False) or QARepVGGBlockV2 (True):
    relu(bn(branch_sum [+ avg_pool2d(x, 3, 1, 1, count_include_pad)])). `keep_post_bn` (the
    library's deploy option) does not change the function."""

    def forward(
        ck: Checkpoint,
        x: torch.Tensor,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        keep_post_bn: bool = False,
    ) -> torch.Tensor:
        identity = has_identity(in_channels, out_channels, stride)
        y = branch_sum(ck, x, stride, groups, identity)
        if avg_pool and identity:
            y = y + F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
        return F.relu(bn(ck, "bn", y, EPS))

    return forward


REFERENCE: dict[str, Callable[..., torch.Tensor]] = {
    "QARepVGGBlockV2": qarepvgg_block_v2,
    "yolov6.QARepVGGBlock": yolov6_block(avg_pool=False),
    "yolov6.QARepVGGBlockV2": yolov6_block(avg_pool=True),
}


def repvgg_model(
    ck: Checkpoint, x: torch.Tensor, num_blocks: tuple[int, ...], widths: tuple[float, ...]
) -> torch.Tensor:
    """cxxgtxy RepVGG(block_cls=QARepVGGBlockV2): stage0 3 -> min(64, int(64 w0)) stride 2; stage
    i: num_blocks[i] blocks to int(base_i w_i) channels, the first stride 2; mean over H, W;
    linear."""
    planes = min(64, int(64 * widths[0]))
    x = qarepvgg_block_v2(block_prefix(ck, "stage0"), x, 3, planes, 3, stride=2, padding=1)
    for i, (base, n, w) in enumerate(zip((64, 128, 256, 512), num_blocks, widths)):
        out = int(base * w)
        for j in range(n):
            sub = block_prefix(ck, f"stage{i + 1}.{j}")
            x = qarepvgg_block_v2(sub, x, planes, out, 3, stride=2 if j == 0 else 1, padding=1)
            planes = out
    return F.linear(x.mean(dim=(2, 3)), ck["linear.weight"], ck["linear.bias"])


# ----------------------------------------------------------------------------- the cases

# (official class, official constructor arguments); channels of 8 so that groups 2 and 4 fit.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("QARepVGGBlockV2", dict(in_channels=8, out_channels=8, kernel_size=3, padding=1)),
    ("QARepVGGBlockV2", dict(in_channels=8, out_channels=16, kernel_size=3, padding=1)),
    ("QARepVGGBlockV2", dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1)),
    ("QARepVGGBlockV2", dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1, groups=2)),
    ("QARepVGGBlockV2", dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=4)),
    ("QARepVGGBlockV2", dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, act=torch.nn.SiLU())),
    ("QARepVGGBlockV2", dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, act=torch.nn.Identity)),
    ("yolov6.QARepVGGBlock", dict(in_channels=8, out_channels=8)),
    ("yolov6.QARepVGGBlock", dict(in_channels=8, out_channels=8, keep_post_bn=True)),
    ("yolov6.QARepVGGBlock", dict(in_channels=8, out_channels=16, stride=2)),
    ("yolov6.QARepVGGBlock", dict(in_channels=8, out_channels=8, stride=2, keep_post_bn=True)),
    ("yolov6.QARepVGGBlock", dict(in_channels=8, out_channels=8, groups=2)),
    ("yolov6.QARepVGGBlockV2", dict(in_channels=8, out_channels=8)),
    ("yolov6.QARepVGGBlockV2", dict(in_channels=8, out_channels=8, keep_post_bn=True)),
    ("yolov6.QARepVGGBlockV2", dict(in_channels=8, out_channels=16)),
    ("yolov6.QARepVGGBlockV2", dict(in_channels=8, out_channels=8, stride=2)),
    ("yolov6.QARepVGGBlockV2", dict(in_channels=8, out_channels=16, stride=2, keep_post_bn=True)),
    ("yolov6.QARepVGGBlockV2", dict(in_channels=8, out_channels=8, groups=4, keep_post_bn=True)),
]


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    """'class-argument=value-...', an activation module shown by its class name."""
    cls, kw = case
    shown = {k: getattr(v, "__name__", type(v).__name__) if k == "act" else v for k, v in kw.items()}
    return "-".join([cls, *(f"{k}={v}" for k, v in shown.items())])


def test_every_official_class_has_a_reference_and_cases() -> None:
    assert set(REFERENCE) == set(qarepvgg.OFFICIAL)
    assert {cls for cls, _ in CASES} == set(qarepvgg.OFFICIAL)


@pytest.mark.parametrize("cls,kwargs", CASES, ids=[case_id(c) for c in CASES])
def test_library_train_and_deploy_forms_match_the_reference(cls: str, kwargs: dict[str, Any]) -> None:
    spec, ck, x, ref = official_run(cls, kwargs, REFERENCE[cls], 0)
    assert_forms_match(spec, ck, x, ref, TRAIN_TOL, DEPLOY_TOL)


def test_a0_model_matches_the_reference() -> None:
    spec, ck, x, ref = model_run(
        "QARepVGGV2-A0", repvgg_model, num_blocks=(2, 4, 14, 1), widths=(0.75, 0.75, 0.75, 2.5)
    )
    assert_forms_match(spec, ck, x, ref, MODEL_TOL, MODEL_TOL)


# ----------------------------------------------------------------------------- mutations


def is_identity(branch: Branch) -> bool:
    """The raw identity: a branch of no node."""
    return branch == ()


def is_avg_pool(branch: Branch) -> bool:
    return len(branch) == 1 and isinstance(branch[0], AvgPool)


# (label, official class, constructor arguments, the mis-described copy of its description)
MUTANTS: list[tuple[str, str, dict[str, Any], Callable[[Any], Block]]] = [
    (
        "cxxgtxy-identity-dropped",
        "QARepVGGBlockV2",
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1),
        lambda s: drop_branches(s, is_identity),
    ),
    (
        "yolov6-v1-identity-dropped",
        "yolov6.QARepVGGBlock",
        dict(in_channels=8, out_channels=8, keep_post_bn=True),
        lambda s: drop_branches(s, is_identity),
    ),
    (
        "yolov6-v2-avg-pool-dropped",
        "yolov6.QARepVGGBlockV2",
        dict(in_channels=8, out_channels=8),
        lambda s: drop_branches(s, is_avg_pool),
    ),
    (
        "dense-bn-and-post-bn-swapped",
        "QARepVGGBlockV2",
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1),
        lambda s: swap_names(s, "rbr_dense.bn", "bn"),
    ),
    (
        "post-bn-eps-1e-3",
        "yolov6.QARepVGGBlockV2",
        dict(in_channels=8, out_channels=8),
        lambda s: set_eps(s, "bn", 1e-3),
    ),
    (
        "dense-bn-eps-1e-3",
        "QARepVGGBlockV2",
        dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1),
        lambda s: set_eps(s, "rbr_dense.bn", 1e-3),
    ),
]


@pytest.mark.parametrize("label,cls,kwargs,mutation", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_reference_rejects_a_mis_described_copy(
    label: str, cls: str, kwargs: dict[str, Any], mutation: Callable[[Any], Block]
) -> None:
    spec, ck, x, ref = official_run(cls, kwargs, REFERENCE[cls], 0, trained_like)
    # measured mutant errors: identity dropped 9.3e-2, avg pool dropped 2.6e-2, BNs swapped 0.22,
    # eps 1e-3 on `bn` 5.2e-2, on `rbr_dense.bn` 5.4e-2
    assert_mutant_caught(mutation(spec), spec, ck, x, ref, TRAIN_TOL)
