"""User-style modules for the graph-pass tests: multi-branch blocks written the way users write
them (their own names, `a + b + c`, `torch.add`, `sum([...])`, nn.Sequential branches,
functional convs), and traps that must not fuse. BN statistics are randomised so that every
fold is visible in the output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

C = 4


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters everywhere; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return module.eval()


def cbn(cin: int, cout: int, k, stride=1, padding=0, dilation=1, groups=1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False), nn.BatchNorm2d(cout))


class PlusBlock(nn.Module):
    """RepVGG-like, written as `a + b + c` with the user's own names."""

    def __init__(self) -> None:
        super().__init__()
        self.big, self.small, self.skip = cbn(C, C, 3, padding=1), cbn(C, C, 1), nn.BatchNorm2d(C)

    def forward(self, x):
        return F.relu(self.big(x) + self.small(x) + self.skip(x))


class TorchAddBlock(nn.Module):
    """torch.add of a conv+BN, an identity and an average pool + BN."""

    def __init__(self) -> None:
        super().__init__()
        self.k = cbn(C, C, 3, padding=1)
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(C))

    def forward(self, x):
        return torch.add(torch.add(self.k(x), x), self.pool(x))


class SumListBlock(nn.Module):
    """sum([...]) of functional convs (weights as parameters) and a per-channel scale."""

    def __init__(self) -> None:
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(C, C, 3, 3) * 0.2)
        self.b3 = nn.Parameter(torch.randn(C) * 0.1)
        self.w1 = nn.Parameter(torch.randn(C, C, 1, 1) * 0.2)
        self.gain = nn.Parameter(torch.randn(C))

    def forward(self, x):
        parts = [F.conv2d(x, self.w3, self.b3, padding=1), F.conv2d(x, self.w1), x * self.gain.view(1, -1, 1, 1)]
        return sum(parts)


class ACBlock(nn.Module):
    """ACNet: 3x3 + 1x3 + 3x1, each with its BN, stride 2, groups 2."""

    def __init__(self) -> None:
        super().__init__()
        self.square = cbn(C, C, 3, 2, 1, groups=2)
        self.hor = cbn(C, C, (1, 3), 2, (0, 1), groups=2)
        self.ver = cbn(C, C, (3, 1), 2, (1, 0), groups=2)

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class BNAndPad(nn.Module):
    """Diverse Branch Block's BN-and-pad, written functionally: BN, then a border of BN(0)."""

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(channels), pad

    def forward(self, x):
        b = self.bn
        zero = (b.bias - b.running_mean * b.weight / torch.sqrt(b.running_var + b.eps)).detach()
        zero = zero.view(1, -1, 1, 1)
        return F.pad(b(x) - zero, [self.pad] * 4) + zero


class DBBlock(nn.Module):
    """Diverse Branch Block: kxk + 1x1 + (1x1 -> BN-and-pad -> avg pool -> BN) +
    (1x1 -> BN-and-pad -> kxk -> BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.origin, self.one = cbn(C, C, 3, padding=1), cbn(C, C, 1)
        self.avg = nn.Sequential(
            nn.Conv2d(C, C, 1, bias=False), BNAndPad(C, 1), nn.AvgPool2d(3, 1, 0), nn.BatchNorm2d(C)
        )
        self.kxk = nn.Sequential(
            nn.Conv2d(C, 2 * C, 1, bias=False),
            BNAndPad(2 * C, 1),
            nn.Conv2d(2 * C, C, 3, bias=False),
            nn.BatchNorm2d(C),
        )

    def forward(self, x):
        return self.origin(x) + self.one(x) + self.avg(x) + self.kxk(x)


class QABlock(nn.Module):
    """QARepVGG: 3x3+BN, a plain 1x1 (no BN), the identity, then a BN after the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.one, self.bn = cbn(C, C, 3, padding=1), nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)

    def forward(self, x):
        return F.relu(self.bn(self.dense(x) + self.one(x) + x))


# --------------------------------------------------------------------------- traps


class TwoBranch(nn.Module):
    """a(x) + b(x) with the given branch modules (the trap is in one of them)."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


class RepMixerBlock(nn.Module):
    """FastViT's RepMixer as timm writes it: x + ls * (mixer(x) - norm(x)), the mixer a depthwise
    3x3 conv + BN, a depthwise 1x1 conv + BN and a BN summed, the norm `0 + BN(x)`, each behind an
    nn.Identity activation."""

    def __init__(self) -> None:
        super().__init__()
        self.k = cbn(C, C, 3, padding=1, groups=C)
        self.s, self.skip, self.norm = cbn(C, C, 1, groups=C), nn.BatchNorm2d(C), nn.BatchNorm2d(C)
        self.act = nn.Identity()
        self.ls = nn.Parameter(torch.randn(C, 1, 1))

    def forward(self, x):
        mixer = self.act(self.skip(x) + self.s(x) + self.k(x))
        norm = self.act(0 + self.norm(x))
        return x + self.ls * (mixer - norm)


class BasicBlock(nn.Module):
    """ResNet BasicBlock: the residual add comes after a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = cbn(C, C, 3, padding=1), cbn(C, C, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + x)


class OtherTensor(nn.Module):
    """One branch reads a different tensor (the block's second input, derived from x)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbn(C, C, 3, padding=1), cbn(C, C, 1)

    def forward(self, x):
        y = torch.tanh(x)
        return self.a(x) + self.b(y)


class AsymPad(nn.Module):
    """A 2x2 conv after an asymmetric F.pad beside a centred 3x3: no common centre."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbn(C, C, 3, padding=1), cbn(C, C, 2)

    def forward(self, x):
        return self.a(x) + self.b(F.pad(x, [0, 1, 0, 1]))


def trap(name: str) -> nn.Module:
    """The trap modules (all with 4 -> 4 channels, input 8x8 or larger)."""
    return {
        "relu-in-branch": lambda: TwoBranch(cbn(C, C, 3, padding=1), nn.Sequential(cbn(C, C, 1), nn.ReLU())),
        "resnet-basic-block": BasicBlock,
        "stride-mismatch": lambda: TwoBranch(cbn(C, C, 3, 2, 1), cbn(C, C, 5)),
        "other-tensor": OtherTensor,
        "asymmetric-padding": AsymPad,
        "bn-train-mode": lambda: TwoBranch(cbn(C, C, 3, padding=1), nn.BatchNorm2d(C)),
    }[name]()
