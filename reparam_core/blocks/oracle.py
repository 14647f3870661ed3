"""The float64 numpy reference forward: the oracle every backend is compared with.

It evaluates any description (reparam_core.blocks.nodes) in the form it is in: in train form every
branch is computed separately (BN in inference mode), in deploy form the fused convs. One rule
per node type below. Slow but exact: conv2d is an im2col + matmul in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from ..errors import ShapeMismatchError
from .fusion import identity_offset
from .nodes import (
    BN,
    GRN,
    SE,
    Act,
    Add,
    Attention,
    AvgPool,
    Bias,
    Block,
    Conv,
    Dropout,
    Flatten,
    GlobalPool,
    LayerNorm,
    Linear,
    Model,
    Node,
    PadBN,
    Rep,
    Scale,
    SpecLike,
    in_form,
    join_key,
    pair,
)
from .schema import Form

Params = Mapping[str, np.ndarray]
F64 = npt.NDArray[np.float64]  # what every computation here holds


def conv2d(
    x: F64,
    w: F64,
    b: F64 | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> F64:
    """NCHW x OIHW (I = C / groups) convolution with symmetric zero padding, in float64."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if cg * groups != c or o % groups:
        raise ShapeMismatchError(f"conv2d: input {x.shape} does not fit kernel {w.shape} with groups={groups}")
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = xp.strides
    cols = as_strided(xp, (n, groups, cg, kh, kw, ho, wo), (s0, s1 * cg, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw))
    wg = w.reshape(groups, o // groups, cg * kh * kw)
    cols = cols.reshape(n, groups, cg * kh * kw, ho * wo)
    out: F64 = np.matmul(wg[None], cols).reshape(n, o, ho, wo)
    if b is not None:
        out = out + np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return out


def _channels(v: F64, x: F64) -> F64:
    """A per-channel vector shaped to broadcast over axis 1 of x (N x C or N x C x H x W)."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def batch_norm(x: F64, p: Params, prefix: str, eps: float) -> F64:
    """Inference BN over axis 1: gamma (x - mean) / sqrt(var + eps) + beta, per channel."""
    gamma, beta, mean, var = (
        _channels(_tensor(p, join_key(prefix, f)), x) for f in ("weight", "bias", "running_mean", "running_var")
    )
    y: F64 = (x - mean) / np.sqrt(var + eps) * gamma + beta
    return y


def layer_norm(x: F64, weight: F64, bias: F64, eps: float) -> F64:
    """Layer norm over axis 1 with biased variance: w (x - mean_c) / sqrt(var_c + eps) + b."""
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
    y: F64 = (x - mean) / np.sqrt(var + eps) * _channels(weight, x) + _channels(bias, x)
    return y


def grn(x: F64, gamma: F64, beta: F64 | None, eps: float) -> F64:
    """Global response normalisation on N x C x H x W: G = ||x||_2 over H, W per (n, c),
    N = G / (mean_c G + eps), y = gamma N x + x (+ beta)."""
    g = np.sqrt((x * x).sum(axis=(2, 3), keepdims=True))
    nx = g / (g.mean(axis=1, keepdims=True) + eps)
    y: F64 = _channels(gamma, x) * (x * nx) + x
    return y if beta is None else y + _channels(beta, x)


def linear(x: F64, w: F64, b: F64 | None) -> F64:
    """y = x W^T + b over axis 1 (pointwise on N x C x H x W)."""
    y: F64 = np.moveaxis(np.moveaxis(x, 1, -1) @ w.T, -1, 1)
    return y if b is None else y + _channels(b, y)


def softmax(x: F64, axis: int = -1) -> F64:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    y: F64 = e / e.sum(axis=axis, keepdims=True)
    return y


def attention(x: F64, heads: int, w_qkv: F64, b_qkv: F64 | None, w_proj: F64, b_proj: F64) -> F64:
    """Multi-head self-attention over the H x W positions of N x C x H x W (nodes.Attention)."""
    n, c, h, w = x.shape
    d = c // heads
    t = x.reshape(n, c, h * w).transpose(0, 2, 1)  # N x T x C
    qkv = t @ w_qkv.T + (0.0 if b_qkv is None else b_qkv)
    q, k, v = qkv.reshape(n, h * w, 3, heads, d).transpose(2, 0, 3, 1, 4)  # each N x heads x T x d
    a = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(d))
    o = (a @ v).transpose(0, 2, 1, 3).reshape(n, h * w, c) @ w_proj.T + b_proj
    y: F64 = o.transpose(0, 2, 1).reshape(n, c, h, w)
    return y


def bn_of_zero(p: Params, prefix: str, eps: float) -> F64:
    """BN(0) per channel: beta - mean gamma / sqrt(var + eps) (what PadBN pads with)."""
    gamma, beta, mean, var = (
        _tensor(p, join_key(prefix, f)) for f in ("weight", "bias", "running_mean", "running_var")
    )
    y: F64 = beta - mean * gamma / np.sqrt(var + eps)
    return y


def relu(x: F64) -> F64:
    return np.maximum(x, 0.0)


def gelu(x: F64) -> F64:
    """The exact GELU x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 (erf from math: numpy has none)."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    y: F64 = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    return y


def silu(x: F64) -> F64:
    return x / (1.0 + np.exp(-x))


def hard_sigmoid(x: F64) -> F64:
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def sigmoid(x: F64) -> F64:
    """1 / (1 + e^-x), as exp(-log(1 + e^-x)): no overflow for large negative x."""
    y: F64 = np.exp(-np.logaddexp(0.0, -x))
    return y


def identity(x: F64) -> F64:
    return x


ACTIVATIONS: dict[str, Callable[[F64], F64]] = {
    "relu": relu,
    "silu": silu,
    "identity": identity,
    "sigmoid": sigmoid,
    "hard_sigmoid": hard_sigmoid,
    "gelu": gelu,
}


def avg_pool(x: F64, k: int, stride: int, padding: int) -> F64:
    """k x k average pooling with zero padding counted (count_include_pad)."""
    c = x.shape[1]
    w = np.full((c, 1, k, k), 1.0 / (k * k))
    return conv2d(x, w, stride=stride, padding=padding, groups=c)


def global_pool(x: F64) -> F64:
    y: F64 = x.mean(axis=(2, 3), keepdims=True)
    return y


def _tensor(p: Params, key: str) -> F64:
    return np.asarray(p[key], np.float64)


def conv_node(x: F64, c: Conv, p: Params, prefix: str) -> F64:
    """A Conv node; a plus_identity conv applies its stored weight + identity_offset."""
    key = join_key(prefix, c.name)
    w = _tensor(p, join_key(key, "weight"))
    if c.plus_identity:
        w = w + identity_offset(c.out_channels, c.groups, c.kernel)
    return conv2d(x, w, p[join_key(key, "bias")] if c.bias else None, c.stride, c.padding, c.dilation, c.groups)


def squeeze_excite(x: F64, se: SE, p: Params, prefix: str) -> F64:
    """x * gate(expand(relu(reduce(mean_hw(x)))))."""
    key = join_key(prefix, se.name)
    s = relu(conv_node(global_pool(x), Conv(se.reduce, se.channels, se.hidden, bias=True), p, key))
    s = conv_node(s, Conv(se.expand, se.hidden, se.channels, bias=True), p, key)
    gate: F64 = ACTIVATIONS[se.gate](s)
    return x * gate


def chain(x: F64, nodes: tuple[Node, ...], p: Params, prefix: str) -> F64:
    for n in nodes:
        x = node_forward(x, n, p, prefix)
    return x


def node_forward(x: F64, node: Node, p: Params, prefix: str = "") -> F64:
    """One node on NCHW x (float64), its tensors at `prefix.<name>.<field>` in p."""
    if isinstance(node, Conv):
        return conv_node(x, node, p, prefix)
    if isinstance(node, BN):
        return batch_norm(x, p, join_key(prefix, node.name), node.eps)
    if isinstance(node, PadBN):
        key = join_key(prefix, node.name)
        y = batch_norm(x, p, key, node.eps)
        q = node.pad
        out: F64 = np.broadcast_to(
            bn_of_zero(p, key, node.eps).reshape(1, -1, 1, 1),
            (y.shape[0], y.shape[1], y.shape[2] + 2 * q, y.shape[3] + 2 * q),
        ).copy()
        out[:, :, q : q + y.shape[2], q : q + y.shape[3]] = y
        return out
    if isinstance(node, AvgPool):
        return avg_pool(x, node.kernel, node.stride, node.padding)
    if isinstance(node, Scale):
        return x * _channels(_tensor(p, join_key(prefix, node.key)), x)
    if isinstance(node, Bias):
        return x + _channels(_tensor(p, join_key(prefix, node.key)), x)
    if isinstance(node, LayerNorm):
        key = join_key(prefix, node.name)
        return layer_norm(x, _tensor(p, join_key(key, "weight")), _tensor(p, join_key(key, "bias")), node.eps)
    if isinstance(node, GRN):
        key = join_key(prefix, node.name)
        beta = _tensor(p, f"{key}.beta") if node.bias else None
        return grn(x, _tensor(p, f"{key}.gamma"), beta, node.eps)
    if isinstance(node, Attention):
        key = join_key(prefix, node.name)
        qkv, proj = join_key(key, node.qkv), join_key(key, node.proj)
        b_qkv = _tensor(p, f"{qkv}.bias") if node.qkv_bias else None
        w_qkv, w_proj, b_proj = (_tensor(p, k) for k in (f"{qkv}.weight", f"{proj}.weight", f"{proj}.bias"))
        return attention(x, node.heads, w_qkv, b_qkv, w_proj, b_proj)
    if isinstance(node, Act):
        return ACTIVATIONS[node.fn](x)
    if isinstance(node, SE):
        return squeeze_excite(x, node, p, prefix)
    if isinstance(node, Linear):
        key = join_key(prefix, node.name)
        return linear(x, _tensor(p, join_key(key, "weight")), _tensor(p, join_key(key, "bias")) if node.bias else None)
    if isinstance(node, GlobalPool):
        return global_pool(x)
    if isinstance(node, Flatten):
        return x.reshape(x.shape[0], -1)
    if isinstance(node, Dropout):
        return x
    if isinstance(node, Rep):
        return rep_forward(x, node, p, prefix)
    if isinstance(node, Add):
        outs = [chain(x, b, p, prefix) for b in node.branches]
        return sum(outs[1:], outs[0])
    if isinstance(node, Block):
        return chain(x, node.body, p, join_key(prefix, node.name))
    raise ShapeMismatchError(f"the oracle has no rule for {type(node).__name__}")


def rep_forward(x: F64, rep: Rep, p: Params, prefix: str) -> F64:
    """A train-form Rep: [x if residual] + scale(bn(sum_i c_i branch_i(x))) (or the branches
    concatenated over channels, then the BN)."""
    outs = [chain(x, b, p, prefix) for b in rep.branches]
    if rep.combine == "concat":
        y = np.concatenate(outs, axis=1)
    else:
        y = sum((rep.coefficient(i) * o for i, o in enumerate(outs[1:], 1)), rep.coefficient(0) * outs[0])
    if rep.bn is not None:
        y = node_forward(y, rep.bn, p, prefix)
    if rep.scale is not None:
        y = node_forward(y, rep.scale, p, prefix)
    return x + y if rep.residual else y


def forward(spec: SpecLike, state: Params, x: F64, form: Form) -> F64:
    """Logits of the model (main head only) for an NCHW input, in float64."""
    desc = in_form(spec, form)
    return chain(np.asarray(x, np.float64), desc.body, state, "")


def forward_with_aux(spec: SpecLike, state: Params, x: F64) -> dict[str, F64]:
    """Train form: the main logits ("main") and every auxiliary head's, in float64."""
    desc = in_form(spec, "train")
    taps = {a.tap: a for a in desc.aux} if isinstance(desc, Model) else {}
    out: dict[str, F64] = {}
    y = np.asarray(x, np.float64)
    for n in desc.body:
        y = node_forward(y, n, state)
        if isinstance(n, Block) and n.name in taps:
            aux = taps[n.name]
            out[aux.name] = chain(y, aux.body, state, "")
    return {"main": y, **out}


def block_forward(spec: SpecLike, params: Params, x: F64, form: Form) -> F64:
    """One block on NCHW x, from block-relative keys, in float64."""
    return forward(spec, params, x, form)
