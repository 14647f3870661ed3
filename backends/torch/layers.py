"""The primitives of the block description in torch, written once for every family: one native
module per parameterised leaf (Conv, BN, PadBN, Scale, Bias, SE, Linear, LayerNorm, GRN,
Attention) and one apply rule per node type.

A chain of nodes is compiled once, at construction, into a `Plan`: a flat tuple of steps
`(rule, arg)`, `rule(owner, x, arg)` (arg: the dotted path of a submodule of the owner, a
parameter-free function, the plans of a sum's branches, ...). The number of axes of the tensor at
each step (4: N x C x H x W, 2: N x C after a Flatten) is known when the chain is compiled, so the
steps hold no shape test (torch.fx traces them). Submodules are looked up by path
when the plan runs, so a module swapped in later (SyncBatchNorm conversion, quantization
wrappers) is the one that runs. Running a plan is a plain loop, cheap and traceable (ONNX
export, `torch.compile`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reparam_core import BN, SE, Act, AvgPool, Conv, Flatten, GlobalPool, PadBN
from reparam_core.blocks.fusion import identity_offset
from reparam_core.blocks.nodes import GRN, Attention, LayerNorm, Linear, conv2d_arguments

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
    "gelu": F.gelu,  # exact (erf)
}


def channel_view(rank: int) -> tuple[int, ...]:
    """The shape that makes a per-channel vector broadcast over axis 1 of a tensor with `rank`
    axes: (1, -1, 1, 1) on N x C x H x W, (1, -1) on N x C."""
    return (1, -1) + (1,) * (rank - 2)


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


class ChannelParameter(nn.Module):
    """One per-channel parameter named `param`, stored with `shape` (default (C,)), applied over
    axis 1 of a tensor with `rank` axes (the base of ChannelScale and ChannelBias)."""

    def __init__(self, channels: int, param: str, shape: tuple[int, ...] | None, rank: int, init: float) -> None:
        super().__init__()
        self.param = param
        self.view = channel_view(rank)
        self.register_parameter(param, nn.Parameter(torch.full((channels,) if shape is None else shape, init)))

    @property
    def vector(self) -> Tensor:
        """The parameter as it broadcasts over axis 1."""
        p: Tensor = getattr(self, self.param)
        return p.reshape(self.view)


class ChannelScale(ChannelParameter):
    """Per-channel scale over axis 1, y[:, c] = p[c] x[:, c] (a Scale node): parameter `param`
    (`weight` by default), initially 1."""

    def __init__(self, channels: int, param: str = "weight", shape: tuple[int, ...] | None = None, rank: int = 4):
        super().__init__(channels, param, shape, rank, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.vector


class ChannelBias(ChannelParameter):
    """Per-channel constant added over axis 1, y[:, c] = x[:, c] + p[c] (a Bias node): parameter
    `param` (`bias` by default), initially 0."""

    def __init__(self, channels: int, param: str = "bias", shape: tuple[int, ...] | None = None, rank: int = 4):
        super().__init__(channels, param, shape, rank, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.vector


class GlobalResponseNorm(nn.Module):
    """Global response normalisation on N x C x H x W (a GRN node): G = ||x||_2 over H, W per
    (n, c), N = G / (mean_c G + eps), y = gamma N x + x (+ beta when `bias`). Parameters `gamma`
    and `beta` stored (1, 1, 1, C) as the official channels-last module, initially 0; without
    `bias` there is no `beta` (a Rep may then hold one at this path, added there)."""

    def __init__(self, channels: int, bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.use_bias = bias
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        if bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: Tensor) -> Tensor:
        g = x.square().sum(dim=(2, 3), keepdim=True).sqrt()
        nx = g / (g.mean(dim=1, keepdim=True) + self.eps)
        y = self.gamma.reshape(1, -1, 1, 1) * (x * nx) + x
        return y + self.beta.reshape(1, -1, 1, 1) if self.use_bias else y


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over the H x W positions of N x C x H x W (an Attention node,
    FastViT's): tokens t = x as N x HW x C, q, k, v = split(qkv(t)) into `heads` heads,
    y = proj(softmax(q k^T / sqrt(C / heads)) v) back to N x C x H x W. Child nn.Linear modules
    under the given names: (C -> 3C, bias when `qkv_bias`) and (C -> C, bias)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False, names: tuple[str, str] = ("qkv", "proj")) -> None:
        super().__init__()
        self.heads = heads
        self._names = names
        self.add_module(names[0], nn.Linear(dim, 3 * dim, bias=qkv_bias))
        self.add_module(names[1], nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        qkv, proj = (getattr(self, n) for n in self._names)
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = qkv(t).reshape(n, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * w, c)
        y: Tensor = proj(o).transpose(1, 2).reshape(n, c, h, w)
        return y


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


ModuleLeaf = Conv | BN | PadBN | SE | Linear | LayerNorm | GRN | Attention
"""The parameterised leaves whose module does not depend on where it runs (Scale and Bias, which
may also hold their parameter on a module of another node, are placed by the block)."""

LEAF_MODULES: dict[type[ModuleLeaf], Callable[[Any], nn.Module]] = {
    Conv: _conv,
    BN: lambda n: (nn.BatchNorm1d if n.dims == 1 else nn.BatchNorm2d)(n.channels, eps=n.eps),
    PadBN: lambda n: PadBatchNorm(n.channels, n.pad, n.eps),
    SE: lambda n: SqueezeExcite(n.channels, n.hidden, (n.reduce, n.expand), n.gate),
    Linear: lambda n: nn.Linear(n.in_features, n.out_features, bias=n.bias),
    LayerNorm: lambda n: nn.LayerNorm(n.channels, eps=n.eps),
    GRN: lambda n: GlobalResponseNorm(n.channels, n.bias, n.eps),
    Attention: lambda n: MultiHeadSelfAttention(n.dim, n.heads, n.qkv_bias, (n.qkv, n.proj)),
}
"""The native module of every parameterised leaf, placed at the leaf's name. Linear and LayerNorm
are torch's own, over the last axis: on N x C x H x W the step moves the channels there
(`channels_last`)."""

CHANNEL_WISE: tuple[type[ModuleLeaf], ...] = (Linear, LayerNorm)
"""The leaves whose module acts on the last axis, applied over axis 1."""

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


def channels_last(owner: nn.Module, x: Tensor, path: str) -> Tensor:
    """The owner's submodule at `path` (acting on the last axis) applied over axis 1 of
    N x C x H x W: channels moved last, the module, channels moved back (explicit permutations:
    the ONNX exporter writes movedim's negative axes into Transpose)."""
    y: Tensor = owner.get_submodule(path)(x.permute(0, 2, 3, 1))
    return y.permute(0, 3, 1, 2)


def scale_by(owner: nn.Module, x: Tensor, arg: tuple[str, tuple[int, ...]]) -> Tensor:
    """x times the owner's parameter at the dotted key, viewed as `arg[1]` (a Scale whose
    parameter sits on another node's module or on the owner itself)."""
    key, view = arg
    return x * owner.get_parameter(key).reshape(view)


def shift_by(owner: nn.Module, x: Tensor, arg: tuple[str, tuple[int, ...]]) -> Tensor:
    """x plus the owner's parameter at the dotted key, viewed as `arg[1]` (such a Bias)."""
    key, view = arg
    return x + owner.get_parameter(key).reshape(view)


def dropout(owner: nn.Module, x: Tensor, p: float) -> Tensor:
    """Dropout in the owner's training mode only."""
    return F.dropout(x, p, owner.training)


def add(owner: nn.Module, x: Tensor, branches: tuple[Plan, ...]) -> Tensor:
    """The sum of chains on one input (the empty chain is the identity)."""
    outs = [run(owner, b, x) for b in branches]
    return sum(outs[1:], outs[0])


class RepPlan(NamedTuple):
    """A compiled train-form Rep: the branch plans, how they combine (`concat` or a sum with
    `coefficients`, None for all 1), the path of the BN after them, the step of the scale after
    the BN, and whether the input is added last."""

    branches: tuple[Plan, ...]
    concat: bool
    coefficients: tuple[float, ...] | None
    bn: str | None
    scale: Step | None
    residual: bool


def _weighted(y: Tensor, c: float) -> Tensor:
    return y if c == 1.0 else y * c


def rep(owner: nn.Module, x: Tensor, arg: RepPlan) -> Tensor:
    """A train-form Rep: [x if residual] + scale(bn(sum_i c_i branch_i(x))), or the branches
    concatenated over channels, then the BN."""
    outs = [run(owner, b, x) for b in arg.branches]
    if arg.concat:
        y = torch.cat(outs, 1)
    else:
        cs = arg.coefficients or (1.0,) * len(outs)
        y = _weighted(outs[0], cs[0])
        for o, c in zip(outs[1:], cs[1:], strict=True):
            y = y + _weighted(o, c)
    if arg.bn is not None:
        y = owner.get_submodule(arg.bn)(y)
    if arg.scale is not None:
        rule, a = arg.scale
        y = rule(owner, y, a)
    return x + y if arg.residual else y


__all__ = [
    "Plan",
    "Step",
    "ModuleLeaf",
    "ACT_FNS",
    "SqueezeExcite",
    "channel_view",
    "ChannelParameter",
    "ChannelScale",
    "ChannelBias",
    "GlobalResponseNorm",
    "MultiHeadSelfAttention",
    "PadBatchNorm",
    "IdentityPlusConv2d",
    "LEAF_MODULES",
    "CHANNEL_WISE",
    "LEAF_FUNCTIONS",
    "RepPlan",
    "run",
    "call",
    "submodule",
    "channels_last",
    "scale_by",
    "shift_by",
    "dropout",
    "add",
    "rep",
]
