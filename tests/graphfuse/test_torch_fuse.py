"""backends.torch.fuse on this project's train-form models, on user-style modules (own names,
`a + b + c`, torch.add, sum([...]), nn.Sequential and functional branches, ACNet, DBB,
QARepVGG), on traps that must stay unfused, and on random branch sums (hypothesis)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from graphfuse_util import (
    ACBlock,
    C,
    DBBlock,
    PlusBlock,
    QABlock,
    RepMixerBlock,
    SumListBlock,
    TorchAddBlock,
    TwoBranch,
    cbn,
    randomize,
    trap,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import backends.torch as bt
from backends.torch.graph_fuse import op_counts
from parity_tests.tolerance import BLOCK_REL, model_tolerance, rel_err
from reparam_core import ReparamError, get_spec, in_form, list_models, random_state
from reparam_core.blocks import oracle
from reparam_core.blocks.nodes import reps

FAST = {"RepVGG-mini", "repghostnet_0_5x"}


def _run(m: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return m(x).double().numpy()


def _convs(m: nn.Module) -> int:
    return sum(isinstance(c, nn.Conv2d) for c in m.modules())


def _multi(report) -> list:
    """The fused sums of at least two branches."""
    return [f for f in report.fused if len([b for b in f.branches if b != "then bn"]) > 1]


# A gap of the matcher, measured: UniRepLKNet's `pwconv2.2` BN reads the Linear's output through
# a permute (channels last -> first) and its layer scale follows: the BN is not folded into the
# Linear through the permute (12 BNs left in UniRepLKNet-A, 27 in -T).
UNFUSED = pytest.mark.xfail(
    strict=True, reason="a BN behind a permute after a Linear (UniRepLKNet's pwconv2) is not folded"
)


def _registry_marks(name: str) -> tuple:
    marks = () if name in FAST else (pytest.mark.slow,)
    return (*marks, UNFUSED) if name.startswith("UniRepLKNet-") else marks


@pytest.mark.parametrize("name", [pytest.param(n, marks=_registry_marks(n)) for n in list_models()])
def test_registry_model_fuses_to_deploy_form(name: str) -> None:
    spec = get_spec(name, 10)
    state = random_state(spec, "train", 0)
    model = bt.load_state(bt.empty_model(name, num_classes=10), state).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    fused = bt.fuse(model, torch.from_numpy(x))
    want = oracle.forward(spec, state, x, "train")
    assert rel_err(_run(fused, torch.from_numpy(x)), want) <= model_tolerance(spec)
    # conv ops of the graph (a conv the pass leaves is a functional call after torch.export)
    deploy = bt.reparameterize(model)
    assert op_counts(fused)["Conv"] == _convs(deploy)
    # a Rep of one branch (MobileOne-S1..S4's 1x1 conv + BN where the channels change) is a lone
    # conv chain in the graph, fused as one but no sum
    assert len(_multi(fused.fuse_report)) == sum(len(r.branches) > 1 for _, r in reps(in_form(spec, "train")))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # functional batch norms (a torch.export graph) too: no more than the deploy form keeps
    # (FastViT's ConvFFN and attention norms stay BNs in the official deploy form)
    assert op_counts(fused)["BN"] <= sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deploy.modules())


USER = {
    "plus": (PlusBlock, ("conv3x3+bn", "conv1x1+bn", "bn"), (3, 3)),
    "torch-add": (TorchAddBlock, ("conv3x3+bn", "identity", "avgpool3+bn"), (3, 3)),
    "sum-list": (SumListBlock, ("conv3x3", "conv1x1", "scale"), (3, 3)),
    "acnet": (ACBlock, ("conv3x3+bn", "conv1x3+bn", "conv3x1+bn"), (3, 3)),
    "dbb": (DBBlock, ("conv3x3+bn", "conv1x1+bn", "conv1x1+bnpad1+avgpool3+bn", "conv1x1+bnpad1+conv3x3+bn"), (3, 3)),
    "qarepvgg": (QABlock, ("conv3x3+bn", "conv1x1", "identity", "then bn"), (3, 3)),
}


@pytest.mark.parametrize("case", list(USER))
def test_user_block_fuses_to_one_conv(case: str) -> None:
    cls, kinds, kernel = USER[case]
    torch.manual_seed(0)
    m = randomize(cls())
    x = torch.randn(2, C, 9, 7)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    fused = bt.fuse(m, x)
    (f,) = fused.fuse_report.fused
    assert f.branches == kinds and f.kernel == kernel
    assert _convs(fused) == 1 and fused.fuse_report.left == []
    assert rel_err(_run(fused, x), _run(copy.deepcopy(m).double(), x.double())) <= BLOCK_REL
    after = m.state_dict()  # the input module is untouched
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())


TRAPS = {
    "relu-in-branch": "(module ReLU), the others read x",
    "resnet-basic-block": "branch 1 reads x",
    "stride-mismatch": "stride (2, 2) differs",
    "other-tensor": "reads tanh",
    "asymmetric-padding": "branch 1 reads pad (function pad)",
    "bn-train-mode": "training mode",
}


@pytest.mark.parametrize("name", list(TRAPS))
def test_trap_is_not_fused(name: str) -> None:
    torch.manual_seed(1)
    m = randomize(trap(name))
    if name == "bn-train-mode":
        m.b.train()
    x = torch.randn(2, C, 8, 8)
    before = _run(m, x)
    fused = bt.fuse(m, x)
    assert _multi(fused.fuse_report) == []
    (left,) = fused.fuse_report.left
    assert TRAPS[name] in left.reason, left.reason
    assert rel_err(_run(fused, x), before) <= BLOCK_REL
    assert "left  " in str(fused.fuse_report)


def test_dilated_branch_wider_than_the_plain_kernel_fuses() -> None:
    """A 3x3 conv with dilation 2 spans 5x5: with a plain 3x3 beside it the sum is one 5x5 conv
    (dilation 1), not the 3x3 dilation-2 conv the largest kernel alone would give."""
    torch.manual_seed(1)
    m = randomize(TwoBranch(cbn(C, C, 3, padding=2, dilation=2), cbn(C, C, 3, padding=1)))
    x = torch.randn(2, C, 8, 8)
    fused = bt.fuse(m, x)
    (f,) = fused.fuse_report.fused
    assert f.branches == ("conv3x3+bn", "conv3x3+bn") and f.kernel == (5, 5) and fused.fuse_report.left == []
    (conv,) = [c for c in fused.modules() if isinstance(c, nn.Conv2d)]
    assert conv.dilation == (1, 1) and conv.padding == (2, 2)
    assert rel_err(_run(fused, x), _run(copy.deepcopy(m).double(), x.double())) <= BLOCK_REL


def test_repmixer_difference_of_sums_fuses() -> None:
    """x + ls * (mixer(x) - norm(x)): the difference and the scale on it go into the terms, the
    inner sum is fused first and read through its nn.Identity; one depthwise 3x3 conv is left."""
    torch.manual_seed(2)
    m = randomize(RepMixerBlock())
    x = torch.randn(2, C, 8, 8)
    fused = bt.fuse(m, x)
    report = fused.fuse_report
    assert report.left == [] and report.after == {"BN": 0, "Conv": 1, "Add": 0, "Linear": 0}, str(report)
    (conv,) = [c for c in fused.modules() if isinstance(c, nn.Conv2d)]
    assert conv.groups == C and conv.kernel_size == (3, 3)
    assert rel_err(_run(fused, x), _run(copy.deepcopy(m).double(), x.double())) <= BLOCK_REL


class _ShapeBranching(nn.Module):
    """Python control flow on a shape: fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbn(C, C, 3, padding=1), cbn(C, C, 1)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = x * 2.0
        return self.a(x) + self.b(x)


class _Inner(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class _DataBranching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(x)


def test_export_fallback_and_uncapturable_module() -> None:
    m = randomize(_ShapeBranching())
    x = torch.randn(1, C, 8, 8)
    fused = bt.fuse(m, x)
    assert fused.fuse_report.capture == "captured with torch.export"
    assert [f.branches for f in fused.fuse_report.fused] == [("conv3x3+bn", "conv1x1+bn")]
    assert rel_err(_run(fused, x), _run(m, x)) <= BLOCK_REL
    with pytest.raises(ReparamError, match="submodule 'inner'"):
        bt.fuse(_DataBranching(), x)


# --------------------------------------------------------------------------- property

BRANCHES = {
    "conv3": lambda: cbn(C, C, 3, padding=1),
    "conv1": lambda: cbn(C, C, 1),
    "bn": lambda: nn.BatchNorm2d(C),
    "identity": nn.Identity,
    "avg": lambda: nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(C)),
    "hor": lambda: cbn(C, C, (1, 3), padding=(0, 1)),
    "chain": lambda: nn.Sequential(nn.Conv2d(C, C, 1), nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)),
}
TRAP_BRANCHES = {
    "relu": lambda: nn.Sequential(cbn(C, C, 3, padding=1), nn.ReLU()),
    "train-bn": lambda: nn.BatchNorm2d(C).train(),
    "bn-then-padded-conv": lambda: nn.Sequential(nn.BatchNorm2d(C), nn.Conv2d(C, C, 3, padding=1)),
}


class _RandomSum(nn.Module):
    def __init__(self, kinds: list[str]) -> None:
        super().__init__()
        self.parts = nn.ModuleList([{**BRANCHES, **TRAP_BRANCHES}[k]() for k in kinds])

    def forward(self, x):
        out = self.parts[0](x)
        for p in self.parts[1:]:
            out = out + p(x)
        return out


@settings(max_examples=max(10, settings.default.max_examples // 30))
@given(
    st.lists(st.sampled_from(sorted(BRANCHES)), min_size=1, max_size=4),
    st.lists(st.sampled_from(sorted(TRAP_BRANCHES)), max_size=1),
    st.integers(0, 2**16),
)
def test_random_branch_sums(good: list[str], traps: list[str], seed: int) -> None:
    kinds = good + traps
    if len(kinds) < 2:
        kinds = kinds + ["identity"]
    torch.manual_seed(seed)
    m = randomize(_RandomSum(kinds), seed)
    for i, k in enumerate(kinds):
        if k == "train-bn":
            m.parts[i].train()
    x = torch.randn(1, C, 6, 6)
    fused = bt.fuse(m, x)
    before = _run(m, x)
    assert rel_err(_run(fused, x), before) <= BLOCK_REL
    trapped = {f"parts.{i}" for i, k in enumerate(kinds) if k in TRAP_BRANCHES}
    for f in _multi(fused.fuse_report):  # a sum of the other branches may fuse, never a trap
        assert not {n.rsplit(".", 1)[0] if n.count(".") > 1 else n for n in f.nodes} & trapped
    if not traps:
        assert len(_multi(fused.fuse_report)) == 1 and _convs(fused) == 1


class BNConv(nn.Module):
    """A BN before a 1x1 conv (NextViT), and a BN before a padded 3x3 conv (not exact: stays)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.c1 = nn.BatchNorm2d(C), nn.Conv2d(C, 2 * C, 1)
        self.bn3, self.c3 = nn.BatchNorm2d(2 * C), nn.Conv2d(2 * C, C, 3, padding=1, bias=False)

    def forward(self, x):
        return self.c3(self.bn3(torch.relu(self.c1(self.bn1(x)))))


def test_bn_before_1x1_conv_fused_before_padded_conv_reported() -> None:
    torch.manual_seed(0)
    m = randomize(BNConv())
    x = torch.randn(2, C, 8, 8)
    report = bt.fuse(m, x).fuse_report
    assert [f.branches for f in report.fused] == [("bn+conv1x1",)]
    assert [a.node for a in report.left] == ["bn3"] and "cannot be fused exactly" in report.left[0].reason
    assert report.after == {"BN": 1, "Conv": 2, "Add": 0, "Linear": 0}
    assert rel_err(_run(bt.fuse(m, x), x), _run(copy.deepcopy(m).double(), x.double())) <= BLOCK_REL
