"""The primitives of the block description as MegEngine: one native module per parameterised
leaf type (Conv, BN, PadBN, Scale, SE, Linear) and the parameter-free rules (AvgPool, Act,
GlobalPool, Flatten, Dropout).

Native shapes are MegEngine's own (grouped conv weights 5-D `[g, O/g, I/g, kh, kw]`, conv bias
`(1, C, 1, 1)`, BN tensors `(1, C, 1, 1)` but flat `(C,)` in `state_dict()`); the core's
`layouts.to_megengine`/`from_megengine` translate. BatchNorm momentum: MegEngine updates
`running = momentum * running + (1 - momentum) * batch`, the opposite convention of torch, so
every BN is built with momentum 0.9 == torch's 0.1. MegEngine's running_var uses the unbiased
batch variance (n/(n-1)), as torch does, so running statistics match torch's step for step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .quiet import import_megengine

mge = import_megengine()
import megengine.functional as F  # noqa: E402
import megengine.module as M  # noqa: E402
from megengine import Tensor  # noqa: E402

from reparam_core import SpecError  # noqa: E402
from reparam_core.blocks.fusion import identity_offset  # noqa: E402
from reparam_core.blocks.nodes import (  # noqa: E402
    BN,
    SE,
    Act,
    AvgPool,
    Conv,
    Dropout,
    Flatten,
    GlobalPool,
    Linear,
    PadBN,
    Scale,
    conv2d_arguments,
)
from reparam_core.blocks.schema import conv_entries  # noqa: E402
from reparam_core.weights.layouts import to_megengine  # noqa: E402

BN_MOMENTUM = 0.9  # MegEngine convention: 0.9 here == torch momentum 0.1

# The leaves that own a native module, and those computed by a parameter-free rule.
ParamLeaf = Conv | BN | PadBN | Scale | SE | Linear
PARAM_LEAVES = (Conv, BN, PadBN, Scale, SE, Linear)
FreeLeaf = AvgPool | Act | GlobalPool | Flatten | Dropout
FREE_LEAVES = (AvgPool, Act, GlobalPool, Flatten, Dropout)


def hard_sigmoid(x: Tensor) -> Tensor:
    return F.relu6(x + 3.0) / 6.0


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "identity": lambda x: x,
    "sigmoid": F.sigmoid,
    "hard_sigmoid": hard_sigmoid,
}


def activation(fn: str) -> Callable[[Tensor], Tensor]:
    if fn not in ACTIVATIONS:
        raise SpecError(f"MegEngine has no rule for the activation {fn!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[fn]


def batch_norm(channels: int, eps: float) -> M.BatchNorm2d:
    """BatchNorm2d with torch-equivalent momentum (MegEngine 0.9 == torch 0.1)."""
    return M.BatchNorm2d(channels, eps=eps, momentum=BN_MOMENTUM)


class PaddedBatchNorm(M.BatchNorm2d):
    """BN, then `pad` pixels on every side filled with BN(0) per channel (running statistics,
    detached: Diverse Branch Block's BNAndPadLayer)."""

    def __init__(self, channels: int, pad: int, eps: float) -> None:
        super().__init__(channels, eps=eps, momentum=BN_MOMENTUM)
        self.pad = int(pad)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        width = ((0, 0), (0, 0), (self.pad, self.pad), (self.pad, self.pad))
        scale = self.weight.detach() / F.sqrt(self.running_var + self.eps)
        bn_zero = self.bias.detach() - self.running_mean * scale
        border = F.nn.pad(F.zeros_like(y), width, constant_value=1.0)
        return F.nn.pad(y, width) + border * bn_zero


class ChannelScale(M.Module):
    """y[c] = weight[c] x[c]; parameter `weight` of shape (C,)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = mge.Parameter(np.ones(channels, np.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * F.reshape(self.weight, (1, -1, 1, 1))


class EmptyInit(M.Module):
    """Mixin for a MegEngine layer whose constructor allocates and randomly initialises its
    weights: `empty=True` draws nothing and (convs) allocates 0-element placeholders instead,
    for a module whose every tensor is set right after (`RepModule._holding`)."""

    def __init__(self, *args: Any, empty: bool = False, **kwargs: Any) -> None:
        self._empty = empty
        super().__init__(*args, **kwargs)
        self._empty = False

    def reset_parameters(self) -> None:
        if not self._empty:
            super().reset_parameters()


class Conv2d(EmptyInit, M.Conv2d):
    """M.Conv2d (`empty=True`: 0-element weight and bias placeholders, no random init)."""

    def _infer_weight_shape(self) -> tuple[int, ...]:
        return (0,) if self._empty else super()._infer_weight_shape()

    def _infer_bias_shape(self) -> tuple[int, ...]:
        return (0,) if self._empty else super()._infer_bias_shape()


class LinearLayer(EmptyInit, M.Linear):
    """M.Linear (`empty=True`: zero weights, no random init)."""


class SqueezeExcite(M.Module):
    """x * gate(expand(relu(reduce(mean_hw(x))))): 1x1 convs with bias under the official child
    names of the SE node (`down`/`up`, `conv_reduce`/`conv_expand`)."""

    def __init__(self, node: SE, empty: bool = False) -> None:
        super().__init__()
        self._reduce, self._expand = node.reduce, node.expand
        self._gate = activation(node.gate)
        setattr(self, node.reduce, Conv2d(node.channels, node.hidden, 1, bias=True, empty=empty))
        setattr(self, node.expand, Conv2d(node.hidden, node.channels, 1, bias=True, empty=empty))

    def forward(self, x: Tensor) -> Tensor:
        s = F.relu(getattr(self, self._reduce)(global_pool(x)))
        return x * self._gate(getattr(self, self._expand)(s))


class IdentityPlusConv2d(Conv2d):
    """Conv2d applying weight + the identity offset of its groups (a `plus_identity` Conv: the
    stored weight is the difference from the identity). The offset is kept as a numpy array in
    the native layout, not a tensor attribute, so it is no part of the state."""

    def __init__(self, node: Conv, empty: bool = False) -> None:
        super().__init__(**conv2d_arguments(node), empty=empty)
        offset = identity_offset(node.out_channels, node.groups, node.kernel)
        info = conv_entries("", node)["weight"]
        self._identity = to_megengine(offset.astype(np.float32), info)

    def forward(self, x: Tensor) -> Tensor:
        return self.calc_conv(x, self.weight + mge.tensor(self._identity), self.bias)


def conv2d(node: Conv, empty: bool = False) -> Conv2d:
    return IdentityPlusConv2d(node, empty) if node.plus_identity else Conv2d(**conv2d_arguments(node), empty=empty)


def leaf_module(node: ParamLeaf, empty: bool = False) -> M.Module:
    """The native module of a parameterised leaf; `empty=True` skips the random initial values
    (see EmptyInit)."""
    if isinstance(node, Conv):
        return conv2d(node, empty)
    if isinstance(node, BN):
        return batch_norm(node.channels, node.eps)
    if isinstance(node, PadBN):
        return PaddedBatchNorm(node.channels, node.pad, node.eps)
    if isinstance(node, Scale):
        return ChannelScale(node.channels)
    if isinstance(node, SE):
        return SqueezeExcite(node, empty)
    return LinearLayer(node.in_features, node.out_features, empty=empty)


def global_pool(x: Tensor) -> Tensor:
    return F.mean(x, axis=(2, 3), keepdims=True)


def avg_pool(node: AvgPool, x: Tensor) -> Tensor:
    """k x k average pooling, zero padding counted (MegEngine mode "average")."""
    return F.avg_pool2d(x, node.kernel, node.stride, node.padding, mode="average")


def functional(node: FreeLeaf, x: Tensor, training: bool) -> Tensor:
    """A parameter-free leaf on x (Dropout is active only when `training`)."""
    if isinstance(node, AvgPool):
        return avg_pool(node, x)
    if isinstance(node, Act):
        return activation(node.fn)(x)
    if isinstance(node, GlobalPool):
        return global_pool(x)
    if isinstance(node, Flatten):
        return F.flatten(x, 1)
    return F.nn.dropout(x, node.p, training=training)


__all__ = [
    "BN_MOMENTUM",
    "ACTIVATIONS",
    "activation",
    "batch_norm",
    "PaddedBatchNorm",
    "ChannelScale",
    "EmptyInit",
    "Conv2d",
    "IdentityPlusConv2d",
    "LinearLayer",
    "SqueezeExcite",
    "conv2d",
    "ParamLeaf",
    "PARAM_LEAVES",
    "FreeLeaf",
    "FREE_LEAVES",
    "leaf_module",
    "global_pool",
    "avg_pool",
    "hard_sigmoid",
    "functional",
    "mge",
    "F",
    "M",
    "Tensor",
]
