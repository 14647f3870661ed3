"""backends.torch.fuse on the way real model code is written (issue 25): norm subclasses whose
forward is F.batch_norm plus an activation (timm's BatchNormAct2d, with its `x.ndim` check),
functional BN / conv on parameters, `out += branch(x)` (fx and torch.export), a classifier whose
forward branches on a `mode` string, BN1d -> Linear, Linear -> BN1d, averaged heads; the in-place
traps that must stay; the report's summary; and timm / mmpretrain models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from graphfuse_util import C, cbn, randomize
from torch import nn

import backends.torch as bt
from backends.torch import zoo
from parity_tests.tolerance import BLOCK_REL, rel_err


def _run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x).double()


def _count(m: nn.Module, cls: type) -> int:
    return sum(isinstance(c, cls) for c in m.modules())


def _randomize_1d(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, nn.BatchNorm1d):
                b.running_mean.copy_(torch.randn(b.num_features, generator=g))
                b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.weight.copy_(torch.randn(b.num_features, generator=g))
                b.bias.copy_(torch.randn(b.num_features, generator=g))
    return m.eval()


# --------------------------------------------------------------------------- capture cases


class BNAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass the way timm writes BatchNormAct2d: a rank check, F.batch_norm on
    its own statistics, then an activation (nn.Identity when there is none)."""

    def __init__(self, c: int, act: bool) -> None:
        super().__init__(c)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(y)


class SubclassBlock(nn.Module):
    """RepVGG written with BNAct: conv3x3-BN + conv1x1-BN + BN (no act), then conv -> BNAct(ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.c3, self.b3 = nn.Conv2d(C, C, 3, padding=1, bias=False), BNAct(C, act=False)
        self.c1, self.b1 = nn.Conv2d(C, C, 1, bias=False), BNAct(C, act=False)
        self.bid = BNAct(C, act=False)
        self.out, self.bout = nn.Conv2d(C, C, 3, padding=1, bias=False), BNAct(C, act=True)

    def forward(self, x):
        y = self.b3(self.c3(x)) + self.b1(self.c1(x)) + self.bid(x)
        return self.bout(self.out(y))


class FunctionalBlock(nn.Module):
    """F.conv2d and F.batch_norm on the module's own parameters and buffers."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w3 = nn.Parameter(torch.randn(C, C, 3, 3, generator=g) * 0.3)
        self.w1 = nn.Parameter(torch.randn(C, C, 1, 1, generator=g) * 0.3)
        for i in range(2):
            self.register_buffer(f"mean{i}", torch.randn(C, generator=g))
            self.register_buffer(f"var{i}", torch.rand(C, generator=g) + 0.5)
            self.register_parameter(f"gamma{i}", nn.Parameter(torch.randn(C, generator=g)))
            self.register_parameter(f"beta{i}", nn.Parameter(torch.randn(C, generator=g)))

    def bn(self, x, i: int):
        stats = [getattr(self, f"{k}{i}") for k in ("mean", "var", "gamma", "beta")]
        return F.batch_norm(x, *stats, training=False, eps=1e-5)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.w3, padding=1), 0) + self.bn(F.conv2d(x, self.w1), 1)


class InplaceBlock(nn.Module):
    """mmpretrain's MobileOne block: `out = 0 + bn(x)`, then `out += branch(x)` per branch."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(C)
        self.branches = nn.ModuleList([cbn(C, C, 3, padding=1), cbn(C, C, 3, padding=1), cbn(C, C, 1)])

    def forward(self, x):
        out = 0
        out = out + self.norm(x)
        for b in self.branches:
            out += b(x)
        return out


class Classifier(nn.Module):
    """A forward that branches on a string, the way mmpretrain's ImageClassifier does."""

    def __init__(self) -> None:
        super().__init__()
        self.block = InplaceBlock()

    def forward(self, inputs, data_samples=None, mode: str = "tensor"):
        if mode == "tensor":
            return self.block(inputs)
        raise RuntimeError(f"mode {mode!r} needs data samples")


def _check(m: nn.Module, x: torch.Tensor, fused_kinds: list[tuple[str, ...]]) -> nn.Module:
    m = randomize(m)
    fused = bt.fuse(m, x)
    report = fused.fuse_report
    assert [f.branches for f in report.fused] == fused_kinds, str(report)
    assert report.left == [], str(report)
    assert rel_err(_run(fused, x).numpy(), _run(copy.deepcopy(m).double(), x.double()).numpy()) <= BLOCK_REL
    assert report.after["BN"] == 0 and "ops before -> after: BN" in str(report)
    return fused


def test_bn_subclass_with_activation() -> None:
    fused = _check(
        SubclassBlock(), torch.randn(2, C, 7, 9), [("conv3x3+bn", "conv1x1+bn", "bn"), ("conv3x3", "then bn")]
    )
    assert _count(fused, nn.Conv2d) == 2 and _count(fused, nn.ReLU) == 1
    assert not any("running_mean" in k for k in fused.state_dict())  # the folded statistics are gone


def test_functional_bn_on_parameters() -> None:
    fused = _check(FunctionalBlock(), torch.randn(1, C, 8, 8), [("conv3x3+bn", "conv1x1+bn")])
    assert _count(fused, nn.Conv2d) == 1


def test_inplace_sum() -> None:
    fused = _check(InplaceBlock(), torch.randn(2, C, 8, 8), [("bn", "conv3x3+bn", "conv3x3+bn", "conv1x1+bn")])
    assert fused.fuse_report.after["Add"] == 0


class _ShapeBranching(InplaceBlock):
    def forward(self, x):
        if x.shape[-1] > 4:  # fx cannot trace this: torch.export, in-place adds as aten.add_
            x = x * 2.0
        return super().forward(x)


def test_inplace_sum_through_export() -> None:
    fused = _check(_ShapeBranching(), torch.randn(1, C, 8, 8), [("bn", "conv3x3+bn", "conv3x3+bn", "conv1x1+bn")])
    assert fused.fuse_report.capture == "captured with torch.export"


def test_forward_with_mode_argument() -> None:
    fused = _check(Classifier(), torch.randn(1, C, 8, 8), [("bn", "conv3x3+bn", "conv3x3+bn", "conv1x1+bn")])
    assert fused.fuse_report.capture == "captured with torch.fx with data_samples=None, mode='tensor'"


class InplaceReadAfter(nn.Module):
    """`out += conv(x)` where the tensor written into is read again after it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(C), cbn(C, C, 3, padding=1)

    def forward(self, x):
        out = self.norm(x)
        keep = out
        out += self.conv(x)
        return out * keep


class InplaceIntoInput(nn.Module):
    """`out = identity(x); out += conv(x)`: writes into x itself (nn.Identity returns its input),
    which the residual reads afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.id, self.conv = nn.Identity(), cbn(C, C, 3, padding=1)

    def forward(self, x):
        y = torch.relu(x)
        out = self.id(y)
        out += self.conv(y)
        return out * y


class InplaceViewReadAfter(InplaceReadAfter):
    """`out += conv(x)` where a view of `out`, taken before, is read after it."""

    def forward(self, x):
        out = self.norm(x)
        flat = out.flatten(1)
        out += self.conv(x)
        return out * flat.view_as(out)


@pytest.mark.parametrize("cls", [InplaceReadAfter, InplaceIntoInput, InplaceViewReadAfter])
def test_inplace_add_read_after(cls: type[nn.Module]) -> None:
    """fx records these `+=` as a new tensor, so its graph differs from the module: the capture
    falls back to torch.export, which records the write; a fold never changes the values."""
    m = randomize(cls())
    x = torch.randn(1, C, 8, 8)
    fused = bt.fuse(m, x)
    report = fused.fuse_report
    assert report.capture == "captured with torch.export"
    assert rel_err(_run(fused, x).numpy(), _run(m, x).numpy()) <= BLOCK_REL
    if cls is InplaceViewReadAfter:  # the write into a view read later is no sum
        assert all(len(f.branches) == 2 and f.branches[1] == "then bn" for f in report.fused), str(report)
        assert any("reads after it" in a.reason for a in report.left), str(report)


# --------------------------------------------------------------------------- linear heads

F_IN, F_OUT = 12, 5


def _norm_linear() -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(F_IN), nn.Dropout(0.1), nn.Linear(F_IN, F_OUT))


class TwoHeads(nn.Module):
    """RepViT / LeViT distillation heads: BN1d -> Linear twice, averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.head, self.head_dist = _norm_linear(), _norm_linear()

    def forward(self, x):
        return (self.head(x) + self.head_dist(x)) / 2


class WeightedHeads(TwoHeads):
    """The distillation heads as this project's RepViT writes them: 0.5 * a + 0.5 * b."""

    def forward(self, x):
        return 0.5 * self.head(x) + self.head_dist(x) * 0.5


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(F_IN, F_OUT, bias=False), nn.BatchNorm1d(F_OUT)

    def forward(self, x):
        return torch.relu(self.bn(self.fc(x)))


class TokenLinearBN(nn.Module):
    """LeViT's LinearNorm: a Linear on (B, N, C) tokens, BN1d over its features through a
    flatten(0, 1), reshaped back."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(F_IN, F_OUT, bias=False), nn.BatchNorm1d(F_OUT)

    def forward(self, x):
        x = self.fc(x.reshape(3, 2, F_IN))
        return self.bn(x.flatten(0, 1)).reshape_as(x).flatten(0, 1)


class ExportedNormLinear(nn.Module):
    """BN1d -> Dropout -> Linear captured by torch.export (aten.batch_norm, aten.dropout, aten.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = _norm_linear()

    def forward(self, x):
        if x.shape[0] > 1:  # fx cannot trace this
            x = x * 2.0
        return self.head(x)


@pytest.mark.parametrize(
    ("make", "kinds"),
    [
        (_norm_linear, [("bn+linear",)]),
        (ExportedNormLinear, [("bn+linear",)]),
        (LinearBN, [("linear+bn",)]),
        (TokenLinearBN, [("linear+bn",)]),
        (TwoHeads, [("bn+linear",), ("bn+linear",), ("linear", "linear", "times 0.5")]),
        (WeightedHeads, [("bn+linear",), ("bn+linear",), ("linear times 0.5", "linear times 0.5")]),
    ],
)
def test_linear_heads_fold(make, kinds) -> None:
    m = _randomize_1d(make())
    x = torch.randn(6, F_IN)
    fused = bt.fuse(m, x)
    report = fused.fuse_report
    assert [f.branches for f in report.fused] == kinds and report.left == [], str(report)
    assert _count(fused, nn.Linear) == 1 and _count(fused, nn.BatchNorm1d) == 0
    assert report.after["BN"] == 0 and report.after["Linear"] == 1
    assert rel_err(_run(fused, x).numpy(), _run(copy.deepcopy(m).double(), x.double()).numpy()) <= BLOCK_REL


# --------------------------------------------------------------------------- zoo models


def _op_counts(m: nn.Module, x: torch.Tensor) -> dict[str, int]:
    from backends.torch.graph_fuse import capture, op_counts

    return op_counts(capture(m, x)[0])


def _randomize_bn(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.copy_(torch.randn(b.num_features, generator=g) * 0.1)
                b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
    return m.eval()


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_timm_repvgg_a0() -> None:
    timm = zoo.import_timm()
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    m = _randomize_bn(timm.create_model("repvgg_a0", num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    fused = bt.fuse(m, x)
    report = fused.fuse_report
    lib = _op_counts(reparameterize_model(copy.deepcopy(m)), x)
    assert report.after["BN"] == 0 and report.left == [], str(report)
    assert all(report.after[k] <= lib[k] for k in lib), (report.after, lib)
    assert _max_rel(_run(fused, x), _run(m, x)) <= 1e-5


@pytest.mark.slow
def test_mmpretrain_mobileone_s0() -> None:
    mmpretrain = zoo.import_mmpretrain()
    torch.manual_seed(0)
    m = _randomize_bn(mmpretrain.get_model("mobileone-s0_8xb32_in1k", pretrained=False))
    x = torch.randn(1, 3, 32, 32)
    fused = bt.fuse(m, x)
    report = fused.fuse_report
    assert report.capture.startswith("captured with torch.fx with")
    assert report.after["BN"] == 0 and report.after["Conv"] == 43 and report.left == [], str(report)
    assert _max_rel(_run(fused, x), _run(m, x)) <= 1e-5
