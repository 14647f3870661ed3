"""The primitives of the block description as MegEngine: one native module per parameterised
leaf type (Conv, BN, PadBN, SE, Linear, LayerNorm, GRN, Attention), the parameter of a Scale or
Bias (held by whichever module its name points at: blocks.RepModule) with its rule, and the
parameter-free rules (AvgPool, Act, GlobalPool, Flatten, Dropout).

Native shapes are MegEngine's own (grouped conv weights 5-D `[g, O/g, I/g, kh, kw]`, conv bias
`(1, C, 1, 1)`, BN tensors `(1, C, 1, 1)` but flat `(C,)` in `state_dict()`); the core's
`layouts.to_megengine`/`from_megengine` translate. BatchNorm momentum: MegEngine updates
`running = momentum * running + (1 - momentum) * batch`, the opposite convention of torch, so
every BN is built with momentum 0.9 == torch's 0.1. MegEngine's running_var uses the unbiased
batch variance (n/(n-1)), as torch does, so running statistics match torch's step for step.
BatchNorm1d holds its tensors (1, C, 1, 1) as BatchNorm2d does. The modules written here (Scale,
Bias, LayerNorm, GRN) hold their parameters in the official shapes (`Scale.stored_shape`, GRN's
(1, 1, 1, C)); Linear is MegEngine's own (weight (O, I), as torch), applied over axis 1.
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
    GRN,
    SE,
    Act,
    Attention,
    AvgPool,
    Bias,
    Conv,
    Dropout,
    Flatten,
    GlobalPool,
    LayerNorm,
    Linear,
    PadBN,
    Scale,
    conv2d_arguments,
)
from reparam_core.blocks.schema import conv_entries  # noqa: E402
from reparam_core.weights.layouts import to_megengine  # noqa: E402

BN_MOMENTUM = 0.9  # MegEngine convention: 0.9 here == torch momentum 0.1

# The leaves that own a native module, and those computed by a parameter-free rule.
ParamLeaf = Conv | BN | PadBN | SE | Linear | LayerNorm | GRN | Attention
PARAM_LEAVES = (Conv, BN, PadBN, SE, Linear, LayerNorm, GRN, Attention)
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
    "gelu": F.gelu,  # MegEngine's GELU is the exact erf form x Phi(x)
}


def activation(fn: str) -> Callable[[Tensor], Tensor]:
    if fn not in ACTIVATIONS:
        raise SpecError(f"MegEngine has no rule for the activation {fn!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[fn]


def batch_norm(node: BN) -> M.BatchNorm2d | M.BatchNorm1d:
    """BatchNorm2d (BatchNorm1d for `dims` 1, on N x C) with torch-equivalent momentum
    (MegEngine 0.9 == torch 0.1)."""
    cls = M.BatchNorm1d if node.dims == 1 else M.BatchNorm2d
    return cls(node.channels, eps=node.eps, momentum=BN_MOMENTUM)


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


def over_channels(v: Tensor, ndim: int) -> Tensor:
    """A tensor of C values (any shape) shaped to broadcast over axis 1 of an `ndim`-D input."""
    return F.reshape(v, (1, -1) + (1,) * (ndim - 2))


def channel_param(node: Scale | Bias) -> Tensor:
    """The parameter of a Scale (ones) or Bias (zeros) node, in its official `stored_shape`."""
    fill = np.ones if isinstance(node, Scale) else np.zeros
    return mge.Parameter(fill(node.stored_shape, np.float32))


def channel_affine(node: Scale | Bias, v: Tensor, x: Tensor) -> Tensor:
    """Scale: y[:, c] = v[c] x[:, c]; Bias: y[:, c] = x[:, c] + v[c] (over axis 1)."""
    w = over_channels(v, x.ndim)
    return x * w if isinstance(node, Scale) else x + w


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
    """M.Linear over axis 1, y = x W^T + b: a classifier on N x C, pointwise on N x C x ...
    (`empty=True`: zero weights, no random init)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            return super().forward(x)
        last = x.ndim - 1
        y = super().forward(F.transpose(x, (0, *range(2, x.ndim), 1)))
        return F.transpose(y, (0, last, *range(1, last)))


class ChannelLayerNorm(M.Module):
    """Layer norm over axis 1 with biased variance, w (x - mean_c) / sqrt(var_c + eps) + b;
    parameters `weight` (ones) and `bias` (zeros), (C,)."""

    def __init__(self, node: LayerNorm) -> None:
        super().__init__()
        self.eps = node.eps
        self.weight = mge.Parameter(np.ones(node.channels, np.float32))
        self.bias = mge.Parameter(np.zeros(node.channels, np.float32))

    def forward(self, x: Tensor) -> Tensor:
        centred = x - F.mean(x, axis=1, keepdims=True)
        var = F.mean(centred * centred, axis=1, keepdims=True)
        y = centred / F.sqrt(var + self.eps)
        return y * over_channels(self.weight, x.ndim) + over_channels(self.bias, x.ndim)


class GlobalResponseNorm(M.Module):
    """GRN on N x C x H x W: G = sqrt(sum_hw x^2), N = G / (mean_c G + eps),
    y = gamma N x + x (+ beta); `gamma`, `beta` (zeros) held (1, 1, 1, C) as the official ones.
    Without `bias` there is no `beta` here (a Bias node may put its own `beta` on this module:
    UniRepLKNet's, which its deploy form folds into the Linear after it)."""

    def __init__(self, node: GRN) -> None:
        super().__init__()
        self.eps, self.has_beta = node.eps, node.bias
        self.gamma = mge.Parameter(np.zeros(node.stored_shape, np.float32))
        if node.bias:
            self.beta = mge.Parameter(np.zeros(node.stored_shape, np.float32))

    def forward(self, x: Tensor) -> Tensor:
        g = F.sqrt(F.sum(x * x, axis=(2, 3), keepdims=True))
        y = over_channels(self.gamma, 4) * (x * (g / (F.mean(g, axis=1, keepdims=True) + self.eps))) + x
        return y + over_channels(self.beta, 4) if self.has_beta else y


def softmax(x: Tensor) -> Tensor:
    """Softmax over the last axis, written out: exp(x - max) / sum exp(x - max)."""
    e = F.exp(x - F.max(x, axis=-1, keepdims=True))
    return e / F.sum(e, axis=-1, keepdims=True)


class SelfAttention(M.Module):
    """Multi-head self-attention over the H x W positions of N x C x H x W, channels first
    throughout: qkv = W_qkv x (N x 3C x T, T = HW) split into q, k, v of N x heads x d x T
    (d = C / heads); a = softmax(q^T k / sqrt(d)) (N x heads x T x T); o = v a^T, heads
    concatenated back to N x C x T, then `proj`. Linears under the node's child names."""

    def __init__(self, node: Attention, empty: bool = False) -> None:
        super().__init__()
        self._qkv, self._proj = node.qkv, node.proj
        self.heads, self.head_dim = node.heads, node.dim // node.heads
        setattr(self, node.qkv, LinearLayer(node.dim, 3 * node.dim, bias=node.qkv_bias, empty=empty))
        setattr(self, node.proj, LinearLayer(node.dim, node.dim, empty=empty))

    def forward(self, x: Tensor) -> Tensor:
        qkv = getattr(self, self._qkv)(F.flatten(x, 2))
        qkv = F.reshape(qkv, (qkv.shape[0], 3, self.heads, self.head_dim, -1))
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        a = softmax(F.matmul(q, k, transpose_a=True) * (self.head_dim**-0.5))
        o = F.matmul(v, a, transpose_b=True)
        return F.reshape(getattr(self, self._proj)(F.reshape(o, (o.shape[0], -1, o.shape[-1]))), x.shape)


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
        return batch_norm(node)
    if isinstance(node, PadBN):
        return PaddedBatchNorm(node.channels, node.pad, node.eps)
    if isinstance(node, SE):
        return SqueezeExcite(node, empty)
    if isinstance(node, LayerNorm):
        return ChannelLayerNorm(node)
    if isinstance(node, GRN):
        return GlobalResponseNorm(node)
    if isinstance(node, Attention):
        return SelfAttention(node, empty)
    return LinearLayer(node.in_features, node.out_features, bias=node.bias, empty=empty)


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
    "over_channels",
    "channel_param",
    "channel_affine",
    "EmptyInit",
    "Conv2d",
    "IdentityPlusConv2d",
    "LinearLayer",
    "ChannelLayerNorm",
    "GlobalResponseNorm",
    "softmax",
    "SelfAttention",
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
