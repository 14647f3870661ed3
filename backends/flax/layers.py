"""Small Flax NNX layers shared by the blocks and models: a torch-compatible BatchNorm, a conv
with explicit symmetric padding, squeeze-excite, and parameter-free placeholders.

Layout: activations are NHWC inside; conv kernels HWIO with I = in / groups (nnx.Conv with
`feature_group_count`); linear kernels (in, out). Canonical <-> native tensor conversion happens
only in reparam_core.layouts (see api.py).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

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

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = FLAX_BN_MOMENTUM,
                 use_running_average: bool = False, dtype=jnp.float32) -> None:
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


def conv(cin: int, cout: int, k: int, *, stride: int = 1, padding: int = 0, dilation: int = 1,
         groups: int = 1, bias: bool = False, rngs: nnx.Rngs | None = None) -> nnx.Conv:
    """nnx.Conv with EXPLICIT symmetric padding ((p, p), (p, p)) like torch (never 'SAME':
    with stride 2 Flax's 'SAME' pads (0, 1) where torch pads (1, 1))."""
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride),
                    padding=((padding, padding), (padding, padding)),
                    kernel_dilation=(dilation, dilation), feature_group_count=groups,
                    use_bias=bias, rngs=_rngs(rngs))


class ConvBN(nnx.Module):
    """`conv` then `bn` (RepVGG naming: `rbr_dense.conv`, `rbr_dense.bn`)."""

    def __init__(self, conv_: nnx.Conv, bn: BatchNorm) -> None:
        self.conv = conv_
        self.bn = bn

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class Placeholder(nnx.Module):
    """A parameter-free layer that keeps torch's numbering in lists (pool, flatten, ReLU)."""

    def __init__(self, fn: Callable[[jax.Array], jax.Array]) -> None:
        self.fn = fn

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)


def global_pool(x: jax.Array) -> jax.Array:
    """NHWC -> N11C mean over H, W."""
    return jnp.mean(x, axis=(1, 2), keepdims=True)


def flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def hard_sigmoid(x: jax.Array) -> jax.Array:
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu, "silu": jax.nn.silu, "identity": lambda x: x}
GATES: dict[str, Callable[[jax.Array], jax.Array]] = {"sigmoid": jax.nn.sigmoid,
                                                      "hard_sigmoid": hard_sigmoid}


class SqueezeExcite(nnx.Module):
    """x * gate(up(relu(down(mean_hw(x))))) with 1x1 convs with bias under configurable names:
    `down`/`up` + sigmoid (RepVGG), `conv_reduce`/`conv_expand` + hard sigmoid (RepGhostNet)."""

    def __init__(self, channels: int, hidden: int, names: tuple[str, str] = ("down", "up"),
                 gate: str = "sigmoid", *, rngs: nnx.Rngs | None = None) -> None:
        self.names = tuple(names)
        self.gate = gate
        setattr(self, names[0], conv(channels, hidden, 1, bias=True, rngs=rngs))
        setattr(self, names[1], conv(hidden, channels, 1, bias=True, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        down, up = (getattr(self, n) for n in self.names)
        s = jax.nn.relu(down(global_pool(x)))
        return x * GATES[self.gate](up(s))
