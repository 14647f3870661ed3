"""The Flax NNX primitives: one native module per parameterised leaf of the block description
(Conv, BN of N x C x H x W or N x C, PadBN, SE, Linear, LayerNorm, GRN, Attention), the bare
parameters of per-channel Scale and Bias nodes, the dropout stream, and the parameter-free
functions.

Layout: activations are NHWC inside (N x C after a flatten), so every per-channel operation is
over the LAST axis; conv kernels HWIO with I = in / groups (nnx.Conv with
`feature_group_count`); linear kernels (in, out). Canonical <-> native tensor conversion happens
only through reparam_core.weights.layouts (see state.py).

Convolutions compute through `conv_general_dilated` (handed to nnx.Conv), which picks the fastest
formulation of a grouped convolution on XLA's CPU backend by `conv_path`; the parameters and
their keys are those of nnx.Conv whatever the path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from reparam_core import ShapeMismatchError
from reparam_core.blocks import nodes
from reparam_core.blocks.fusion import identity_offset
from reparam_core.weights.layouts import oihw_to_hwio

# torch.nn.BatchNorm2d's default momentum is 0.1 (new = 0.9 * old + 0.1 * batch); in the Flax
# convention (new = momentum * old + (1 - momentum) * batch) that is 0.9.
TORCH_BN_MOMENTUM = 0.1
FLAX_BN_MOMENTUM = 1.0 - TORCH_BN_MOMENTUM


def _rngs(rngs: nnx.Rngs | None) -> nnx.Rngs:
    return rngs if rngs is not None else nnx.Rngs(0)


class BatchNorm(nnx.Module):
    """BatchNorm over the channel (last) axis of NHWC inputs with PyTorch's semantics.

    Parameters `scale`/`bias` (nnx.Param) and running statistics `mean`/`var` (nnx.BatchStat).
    Training mode (`use_running_average=False`): normalise with the BIASED batch variance and
    update the running statistics with `momentum` in the Flax convention (0.9 == torch's 0.1),
    storing the UNBIASED batch variance in `var` exactly as torch.nn.BatchNorm2d does (nnx.BatchNorm
    stores the biased one, so its running variance drifts from torch's by n / (n - 1)).
    Inference mode (`use_running_average=True`): normalise with the running statistics.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = FLAX_BN_MOMENTUM,
        use_running_average: bool = False,
        dtype: DTypeLike = jnp.float32,
    ) -> None:
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.ones((num_features,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), dtype))

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by nnx.view (inference / training views)."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)  # biased: used to normalise
            n = x.size // x.shape[-1]
            unbiased = var * (n / (n - 1)) if n > 1 else var
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1.0 - m) * jax.lax.stop_gradient(mean)
            self.var[...] = m * self.var[...] + (1.0 - m) * jax.lax.stop_gradient(unbiased)
        t = self.scale[...] * jax.lax.rsqrt(var + self.eps)
        return (x - mean) * t + self.bias[...]


class PadBatchNorm(BatchNorm):
    """BatchNorm, then `pad` pixels on every side filled with BN(0) = beta - mean t (Diverse
    Branch Block's BNAndPadLayer: like the official code, the pad value uses the running
    statistics and a detached gamma/beta, read after this call's update in training mode)."""

    def __init__(self, num_features: int, pad: int, *, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        self.pad = pad

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        p = self.pad
        scale, bias = (jax.lax.stop_gradient(v[...]) for v in (self.scale, self.bias))
        fill = bias - self.mean[...] * scale * jax.lax.rsqrt(self.var[...] + self.eps)
        n, h, w, c = y.shape
        out = jnp.broadcast_to(fill.astype(y.dtype), (n, h + 2 * p, w + 2 * p, c))
        return out.at[:, p : p + h, p : p + w, :].set(y)


def channel_param(node: nodes.Scale | nodes.Bias) -> nnx.Param[jax.Array]:
    """The parameter of a per-channel Scale (ones) or Bias (zeros), in its official stored shape
    (`stored_shape`: FastViT's (C, 1, 1), a plain (C,)); it is placed at the node's `key` in the
    scope (an empty `name` puts it on the block itself, UniRepLKNet's `gamma`)."""
    fill = jnp.ones if isinstance(node, nodes.Scale) else jnp.zeros
    return nnx.Param(fill(node.stored_shape, jnp.float32))


def channel_vector(param: nnx.Variable[jax.Array]) -> jax.Array:
    """A per-channel parameter stored in any official shape ((C,), (C, 1, 1), (1, 1, 1, C)) as
    the (C,) vector that broadcasts over the last (channel) axis of NHWC or N x C inputs."""
    return param[...].reshape(-1)


ConvPath = Literal["shift", "split", "xla"]
SHIFT_MAX_CHANNELS_PER_GROUP = 8  # measured: see conv_path
SPLIT_MAX_GROUPS = 8
NHWC_HWIO = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def conv_path(groups: int, in_channels: int, platform: str = "cpu") -> ConvPath:
    """How `conv_general_dilated` computes a convolution with `groups` groups over
    `in_channels` input channels on `platform`:

    - "shift": in_channels / groups <= SHIFT_MAX_CHANNELS_PER_GROUP (depthwise and its
      multipliers included): y = sum over taps (i, j) and group inputs q of
      x_pad[:, i*d : i*d + (Ho-1)*s + 1 : s, j*d : ... : s, g, q] * w[i, j, q, g, :], which XLA
      fuses into one elementwise loop;
    - "split": 1 < groups <= SPLIT_MAX_GROUPS: one dense convolution per group, concatenated;
    - "xla": anything else, and every non-CPU platform: XLA's own convolution
      (`feature_group_count=groups`).

    Measured with jaxlib 0.10.2 on this project's 2-core x86 CPU, batch 8, under jit
    (`python -m benchmarks.conv_paths`): XLA's grouped convolution takes 20-160 ms for a 3x3
    depthwise conv over 56x56x120 to 7x7x960 inputs, "shift" 0.7-3.5 ms (x20-x45); with 2-8 channels per
    group "shift" is x2-x10 faster than XLA; at 16 channels per group it is x4-x10 SLOWER; with
    2-8 groups of 16-64 channels "split" is x1.5-x3 faster than XLA for 3x3 kernels and even for
    1x1 kernels.
    """
    if platform != "cpu" or groups == 1:
        return "xla"
    if in_channels // groups <= SHIFT_MAX_CHANNELS_PER_GROUP:
        return "shift"
    return "split" if groups <= SPLIT_MAX_GROUPS else "xla"


def _out_size(size: int, k: int, stride: int, pad: tuple[int, int], dilation: int) -> int:
    return (size + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1


@functools.partial(jax.jit, static_argnames=("strides", "padding", "dilation", "groups"))
def shifted_conv(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
    groups: int,
) -> jax.Array:
    """A grouped convolution of NHWC x with an HWIO kernel (I = in / groups) as shifted
    multiply-adds: y[n, a, b, g, o] = sum_{i, j, q} xp[n, a*s + i*d, b*s' + j*d', g, q] w[i, j, q,
    g, o] with xp = x zero-padded by `padding` and the output channel g * (out / groups) + o.
    The sum runs over taps in row-major order, then over q."""
    kh, kw, cg, out = w.shape
    n, h, wd, c = x.shape
    (sh, sw), (dh, dw) = strides, dilation
    ho, wo = _out_size(h, kh, sh, padding[0], dh), _out_size(wd, kw, sw, padding[1], dw)
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    wg = w.reshape(kh, kw, cg, groups, out // groups)
    acc: jax.Array | None = None
    for i in range(kh):
        for j in range(kw):
            start = (0, i * dh, j * dw, 0)
            stop = (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c)
            tap = jax.lax.slice(xp, start, stop, (1, sh, sw, 1)).reshape(n, ho, wo, groups, cg)
            for q in range(cg):
                term = tap[..., q : q + 1] * wg[i, j, q]
                acc = term if acc is None else acc + term
    if acc is None:
        raise ShapeMismatchError(f"shifted_conv: a kernel of shape {w.shape} has no tap")
    return acc.reshape(n, ho, wo, out)


@functools.partial(jax.jit, static_argnames=("strides", "padding", "dilation", "groups", "precision"))
def split_conv(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
    groups: int,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """A grouped convolution of NHWC x with an HWIO kernel as `groups` dense convolutions, one
    per group (input channels g*cg..(g+1)*cg, output channels g*og..(g+1)*og), concatenated."""
    cg, og = x.shape[-1] // groups, w.shape[-1] // groups
    return jnp.concatenate(
        [
            jax.lax.conv_general_dilated(
                x[..., g * cg : (g + 1) * cg],
                w[..., g * og : (g + 1) * og],
                strides,
                padding,
                rhs_dilation=dilation,
                dimension_numbers=NHWC_HWIO,
                precision=precision,
            )
            for g in range(groups)
        ],
        axis=-1,
    )


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: jax.lax.ConvDimensionNumbers | None = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: jax.lax.PrecisionLike = None,
    **kwargs: Any,
) -> jax.Array:
    """jax.lax.conv_general_dilated with the path of `conv_path` for 2-D NHWC/HWIO convolutions
    with explicit padding and no input dilation (what `conv` builds); everything else, and any
    extra option (preferred_element_type, out_sharding), goes to XLA's convolution unchanged."""

    def xla() -> jax.Array:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision,
            **kwargs,
        )

    plain = (
        lhs.ndim == 4
        and dimension_numbers == NHWC_HWIO
        and not isinstance(padding, str)
        and tuple(lhs_dilation or (1, 1)) == (1, 1)
        and batch_group_count == 1
        and all(v is None for v in kwargs.values())
    )
    path = conv_path(feature_group_count, lhs.shape[-1], jax.default_backend())
    if not plain or path == "xla":
        return xla()
    args = (tuple(window_strides), tuple(tuple(p) for p in padding), tuple(rhs_dilation or (1, 1)), feature_group_count)
    return shifted_conv(lhs, rhs, *args) if path == "shift" else split_conv(lhs, rhs, *args, precision)


def _conv_plus(offset: np.ndarray, lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """`conv_general_dilated` with the kernel `rhs + offset` (HWIO)."""
    return conv_general_dilated(lhs, rhs + jnp.asarray(offset, rhs.dtype), *args, **kwargs)


def conv(node: nodes.Conv, rngs: nnx.Rngs | None = None) -> nnx.Conv:
    """nnx.Conv of a Conv node (kernel (kh, kw)) with EXPLICIT symmetric padding like torch
    (never 'SAME': with stride 2 Flax's 'SAME' pads (0, 1) where torch pads (1, 1)), computing
    through `conv_general_dilated`. A `plus_identity` conv applies kernel + the identity offset
    of its groups (a constant, not a parameter: the state is nnx.Conv's)."""
    (ph, pw) = node.padding
    compute: Callable[..., jax.Array] = conv_general_dilated
    if node.plus_identity:
        offset = identity_offset(node.out_channels, node.groups, node.kernel)
        compute = functools.partial(_conv_plus, oihw_to_hwio(offset).astype(np.float32))
    return nnx.Conv(
        node.in_channels,
        node.out_channels,
        node.kernel,
        strides=node.stride,
        padding=((ph, ph), (pw, pw)),
        kernel_dilation=node.dilation,
        feature_group_count=node.groups,
        use_bias=node.bias,
        rngs=_rngs(rngs),
        conv_general_dilated=compute,
    )


def global_pool(x: jax.Array) -> jax.Array:
    """NHWC -> N11C mean over H, W."""
    return jnp.mean(x, axis=(1, 2), keepdims=True)


def flatten(x: jax.Array) -> jax.Array:
    """Flatten in torch's (NCHW) element order, whatever the spatial size."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def hard_sigmoid(x: jax.Array) -> jax.Array:
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "identity": lambda x: x,
    "sigmoid": jax.nn.sigmoid,
    "hard_sigmoid": hard_sigmoid,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def avg_pool(x: jax.Array, node: nodes.AvgPool) -> jax.Array:
    """k x k average pooling of NHWC x with zero padding counted (count_include_pad)."""
    k, s, p = node.kernel, node.stride, node.padding
    total = jax.lax.reduce_window(
        x, jnp.zeros((), x.dtype), jax.lax.add, (1, k, k, 1), (1, s, s, 1), ((0, 0), (p, p), (p, p), (0, 0))
    )
    return total / (k * k)


class SqueezeExcite(nnx.Module):
    """x * gate(expand(relu(reduce(mean_hw(x))))) with 1x1 convs with bias under the SE node's
    child names (`down`/`up` + sigmoid in RepVGG, `conv_reduce`/`conv_expand` + hard sigmoid in
    RepGhostNet)."""

    def __init__(self, node: nodes.SE, *, rngs: nnx.Rngs | None = None) -> None:
        self.names = (node.reduce, node.expand)
        self.gate = node.gate
        setattr(self, node.reduce, conv(nodes.Conv(node.reduce, node.channels, node.hidden, bias=True), rngs))
        setattr(self, node.expand, conv(nodes.Conv(node.expand, node.hidden, node.channels, bias=True), rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        reduce, expand = (getattr(self, n) for n in self.names)
        s = jax.nn.relu(reduce(global_pool(x)))
        return x * ACTIVATIONS[self.gate](expand(s))


class DropoutStream(nnx.Module):
    """The dropout RNG stream of one scope (every Dropout node in it draws from it, at its own
    rate): inverted dropout in training mode, the identity when `deterministic`."""

    def __init__(self, rngs: nnx.Rngs | None = None, *, deterministic: bool = False) -> None:
        self.rngs = _rngs(rngs)["dropout"].fork()
        self.deterministic = deterministic

    def reseed(self, key: jax.Array) -> None:
        """Restart the stream from `key` (a typed JAX key): the next draws are those of a stream
        created with it, whatever was drawn before."""
        self.rngs.key.set_value(key)
        self.rngs.count.set_value(jnp.zeros((), jnp.uint32))

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by nnx.view (inference / training views)."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, x: jax.Array, rate: float) -> jax.Array:
        if self.deterministic or rate == 0.0:
            return x
        keep = jax.random.bernoulli(self.rngs(), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class LayerNorm(nnx.Module):
    """Layer norm over the last (channel) axis with the biased variance: scale (x - mean_c) /
    sqrt(var_c + eps) + bias, parameters `scale` (canonical `weight`) and `bias` (C,), named as
    nnx.LayerNorm names them. The variance is the mean of the squared deviations (not E[x^2] -
    E[x]^2, which loses precision when |mean| >> std)."""

    def __init__(self, node: nodes.LayerNorm) -> None:
        self.eps = float(node.eps)
        self.scale = nnx.Param(jnp.ones((node.channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((node.channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        d = x - mean
        var = jnp.mean(jnp.square(d), axis=-1, keepdims=True)
        return d * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class GRN(nnx.Module):
    """Global response normalisation of NHWC x: G = sqrt(sum_hw x^2) per (n, c), N = G / (mean_c
    G + eps), y = gamma N x + x (+ beta when the node has its bias); `gamma`, `beta` in the
    official (1, 1, 1, C) shape, which broadcasts over NHWC as it is. Without the bias no `beta`
    is created here (a `Bias` node of a Rep may own that key, UniRepLKNet's train form)."""

    def __init__(self, node: nodes.GRN) -> None:
        self.eps = float(node.eps)
        self.use_bias = node.bias
        self.gamma = nnx.Param(jnp.zeros(node.stored_shape, jnp.float32))
        if node.bias:
            self.beta = nnx.Param(jnp.zeros(node.stored_shape, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        g = jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True))
        n = g / (jnp.mean(g, axis=-1, keepdims=True) + self.eps)
        y = self.gamma[...] * (x * n) + x
        return y + self.beta[...] if self.use_bias else y


def linear(node: nodes.Linear, rngs: nnx.Rngs | None = None) -> nnx.Linear:
    """nnx.Linear (kernel (in, out)) of a Linear node: over the last axis, so a classifier on
    N x C and a pointwise layer on NHWC alike."""
    return nnx.Linear(node.in_features, node.out_features, use_bias=node.bias, rngs=_rngs(rngs))


class Attention(nnx.Module):
    """Multi-head self-attention over the H x W positions of NHWC x: tokens t = x as N x HW x C
    (row-major positions, the order of torch's flatten of N x C x H x W); q, k, v = split(qkv(t))
    into `heads` heads of d = C / heads; y = proj(concat_heads(softmax(q k^T / sqrt d) v)), back
    to NHWC. The Linears live at the node's child names (`qkv`, `proj`)."""

    def __init__(self, node: nodes.Attention, *, rngs: nnx.Rngs | None = None) -> None:
        self.names = (node.qkv, node.proj)
        self.heads = node.heads
        setattr(self, node.qkv, linear(nodes.Linear(node.qkv, node.dim, 3 * node.dim, node.qkv_bias), rngs))
        setattr(self, node.proj, linear(nodes.Linear(node.proj, node.dim, node.dim), rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        qkv, proj = (getattr(self, n) for n in self.names)
        n, h, w, c = x.shape
        d = c // self.heads
        t = qkv(x.reshape(n, h * w, c)).reshape(n, h * w, 3, self.heads, d)
        q, k, v = (t[:, :, i] for i in range(3))  # each N x T x heads x d
        a = jax.nn.softmax(jnp.einsum("nthd,nshd->nhts", q, k) * (d**-0.5), axis=-1)
        o = jnp.einsum("nhts,nshd->nthd", a, v).reshape(n, h * w, c)
        return proj(o).reshape(n, h, w, c)


Leaf = nodes.Conv | nodes.BN | nodes.PadBN | nodes.SE | nodes.Linear | nodes.LayerNorm | nodes.GRN | nodes.Attention


def leaf_module(node: Leaf, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """The native module of a parameterised leaf of the description (a Scale or Bias is a bare
    parameter, see `channel_param`)."""
    if isinstance(node, nodes.Conv):
        return conv(node, rngs)
    if isinstance(node, nodes.PadBN):
        return PadBatchNorm(node.channels, node.pad, eps=node.eps)
    if isinstance(node, nodes.BN):
        return BatchNorm(node.channels, eps=node.eps)
    if isinstance(node, nodes.SE):
        return SqueezeExcite(node, rngs=rngs)
    if isinstance(node, nodes.LayerNorm):
        return LayerNorm(node)
    if isinstance(node, nodes.GRN):
        return GRN(node)
    if isinstance(node, nodes.Attention):
        return Attention(node, rngs=rngs)
    return linear(node, rngs)


LEAF_TYPES = (
    nodes.Conv,
    nodes.BN,
    nodes.PadBN,
    nodes.SE,
    nodes.Linear,
    nodes.LayerNorm,
    nodes.GRN,
    nodes.Attention,
)
CHANNEL_PARAM_TYPES = (nodes.Scale, nodes.Bias)

__all__ = [
    "TORCH_BN_MOMENTUM",
    "FLAX_BN_MOMENTUM",
    "BatchNorm",
    "PadBatchNorm",
    "SqueezeExcite",
    "LayerNorm",
    "GRN",
    "Attention",
    "linear",
    "channel_param",
    "channel_vector",
    "CHANNEL_PARAM_TYPES",
    "DropoutStream",
    "conv",
    "conv_path",
    "conv_general_dilated",
    "shifted_conv",
    "split_conv",
    "leaf_module",
    "LEAF_TYPES",
    "ACTIVATIONS",
    "avg_pool",
    "global_pool",
    "flatten",
    "hard_sigmoid",
]
