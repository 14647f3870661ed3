"""The primitives of the block description in torch, written once for every family: one native
module per parameterised leaf (Conv, BN, PadBN, Scale, SE, Linear) and one apply rule per node
type.

A chain of nodes is compiled once, at construction, into a `Plan`: a flat tuple of steps
`(rule, arg)`, `rule(owner, x, arg)` (arg: the dotted path of a submodule of the owner, a
parameter-free function, or the plans of a sum's branches). Submodules are looked up by path
when the plan runs, so a module swapped in later (SyncBatchNorm conversion, quantization
wrappers) is the one that runs. Running a plan is a plain loop, cheap and traceable (ONNX
export, `torch.compile`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reparam_core import BN, SE, Act, AvgPool, Conv, Flatten, GlobalPool, Linear, PadBN, Scale
from reparam_core.blocks.fusion import identity_offset
from reparam_core.blocks.nodes import conv2d_arguments

Tensor = torch.Tensor
Rule = Callable[[nn.Module, Tensor, Any], Tensor]
Step = tuple[Rule, Any]
Plan = tuple[Step, ...]


def _identity(x: Tensor) -> Tensor:
    return x


ACT_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "identity": _identity,
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": F.hardsigmoid,
}

# --------------------------------------------------------------------------- leaf modules


class SqueezeExcite(nn.Module):
    """x * gate(expand(relu(reduce(mean_hw(x))))), 1x1 convs with bias under the given child
    names (`down`/`up` with a sigmoid gate in RepVGG, `conv_reduce`/`conv_expand` with a hard
    sigmoid in RepGhostNet)."""

    def __init__(
        self, channels: int, hidden: int, names: tuple[str, str] = ("down", "up"), gate: str = "sigmoid"
    ) -> None:
        super().__init__()
        self._names = names
        self.gate = ACT_FNS[gate]
        self.add_module(names[0], nn.Conv2d(channels, hidden, 1, bias=True))
        self.add_module(names[1], nn.Conv2d(hidden, channels, 1, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        reduce, expand = (getattr(self, n) for n in self._names)
        return x * self.gate(expand(F.relu(reduce(x.mean(dim=(2, 3), keepdim=True)))))


class ChannelScale(nn.Module):
    """Per-channel scale y[c] = weight[c] x[c] (parameter `weight`, shape (C,), initially 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.reshape(1, -1, 1, 1)


class PadBatchNorm(nn.BatchNorm2d):
    """BN, then `pad` pixels on every side filled with BN(0) computed from the running
    statistics, detached (Diverse Branch Block's BNAndPadLayer, its BN parameters held
    directly)."""

    running_mean: Tensor  # always tracked (track_running_stats=True): never None here
    running_var: Tensor

    def __init__(self, channels: int, pad: int, eps: float = 1e-5) -> None:
        super().__init__(channels, eps=eps)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.pad == 0:
            return y
        zero = (
            (self.bias - self.running_mean * self.weight / torch.sqrt(self.running_var + self.eps))
            .detach()
            .reshape(1, -1, 1, 1)
        )
        return F.pad(y - zero, [self.pad] * 4) + zero


class IdentityPlusConv2d(nn.Conv2d):
    """nn.Conv2d applying weight + the identity offset of its groups (a `plus_identity` Conv:
    the stored weight is the difference from the identity). The offset is a non-persistent
    buffer: the state keys are nn.Conv2d's."""

    identity: Tensor  # registered as a buffer in __init__

    def __init__(self, node: Conv) -> None:
        super().__init__(**conv2d_arguments(node))
        offset = identity_offset(node.out_channels, node.groups, node.kernel)
        self.register_buffer("identity", torch.from_numpy(offset.astype(np.float32)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self._conv_forward(x, self.weight + self.identity.to(self.weight), self.bias)
        return y


def _conv(node: Conv) -> nn.Module:
    return IdentityPlusConv2d(node) if node.plus_identity else nn.Conv2d(**conv2d_arguments(node))


ModuleLeaf = Conv | BN | PadBN | Scale | SE | Linear
"""The parameterised leaves (each one native module at the leaf's name)."""

LEAF_MODULES: dict[type[ModuleLeaf], Callable[[Any], nn.Module]] = {
    Conv: _conv,
    BN: lambda n: nn.BatchNorm2d(n.channels, eps=n.eps),
    PadBN: lambda n: PadBatchNorm(n.channels, n.pad, n.eps),
    Scale: lambda n: ChannelScale(n.channels),
    SE: lambda n: SqueezeExcite(n.channels, n.hidden, (n.reduce, n.expand), n.gate),
    Linear: lambda n: nn.Linear(n.in_features, n.out_features),
}
"""The native module of every parameterised leaf, placed at the leaf's name."""

# --------------------------------------------------------------------------- parameter-free leaves


def _global_pool(x: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(x, 1)


def _flatten(x: Tensor) -> Tensor:
    return torch.flatten(x, 1)


LEAF_FUNCTIONS: dict[type, Callable[[Any], Callable[[Tensor], Tensor]]] = {
    Act: lambda n: ACT_FNS[n.fn],
    AvgPool: lambda n: partial(
        F.avg_pool2d, kernel_size=n.kernel, stride=n.stride, padding=n.padding, count_include_pad=True
    ),
    GlobalPool: lambda n: _global_pool,
    Flatten: lambda n: _flatten,
}
"""The function of every parameter-free leaf (Dropout, which needs the train mode, is a rule)."""

# --------------------------------------------------------------------------- apply rules


def run(owner: nn.Module, plan: Plan, x: Tensor) -> Tensor:
    """Apply a compiled chain to x."""
    for rule, arg in plan:
        x = rule(owner, x, arg)
    return x


def call(owner: nn.Module, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """A parameter-free leaf's function."""
    return fn(x)


def submodule(owner: nn.Module, x: Tensor, path: str) -> Tensor:
    """The owner's submodule at `path` (a parameterised leaf or a nested block)."""
    y: Tensor = owner.get_submodule(path)(x)
    return y


def dropout(owner: nn.Module, x: Tensor, p: float) -> Tensor:
    """Dropout in the owner's training mode only."""
    return F.dropout(x, p, owner.training)


def add(owner: nn.Module, x: Tensor, branches: tuple[Plan, ...]) -> Tensor:
    """The sum of chains on one input (the empty chain is the identity)."""
    outs = [run(owner, b, x) for b in branches]
    return sum(outs[1:], outs[0])


def rep(owner: nn.Module, x: Tensor, arg: tuple[tuple[Plan, ...], bool, str | None]) -> Tensor:
    """A train-form Rep: its branches summed (or concatenated over channels), then its BN (the
    submodule at that path)."""
    branches, concat, bn = arg
    y = torch.cat([run(owner, b, x) for b in branches], 1) if concat else add(owner, x, branches)
    return y if bn is None else owner.get_submodule(bn)(y)


__all__ = [
    "Plan",
    "Step",
    "ModuleLeaf",
    "ACT_FNS",
    "SqueezeExcite",
    "ChannelScale",
    "PadBatchNorm",
    "IdentityPlusConv2d",
    "LEAF_MODULES",
    "LEAF_FUNCTIONS",
    "run",
    "call",
    "submodule",
    "dropout",
    "add",
    "rep",
]
