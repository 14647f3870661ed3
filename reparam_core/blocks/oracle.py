"""The float64 numpy reference forward: the oracle every backend is compared with.

It evaluates any description (reparam_core.blocks.nodes) in the form it is in: in train form every
branch is computed separately (BN in inference mode), in deploy form the fused convs. One rule
per node type below. Slow but exact: conv2d is an im2col + matmul in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from ..errors import ShapeMismatchError
from .fusion import identity_offset
from .nodes import (
    BN,
    SE,
    Act,
    Add,
    AvgPool,
    Block,
    Conv,
    Dropout,
    Flatten,
    GlobalPool,
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


def batch_norm(x: F64, p: Params, prefix: str, eps: float) -> F64:
    """Inference BN: gamma (x - mean) / sqrt(var + eps) + beta, per channel."""
    gamma, beta, mean, var = (
        _tensor(p, join_key(prefix, f)).reshape(1, -1, 1, 1) for f in ("weight", "bias", "running_mean", "running_var")
    )
    y: F64 = (x - mean) / np.sqrt(var + eps) * gamma + beta
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


def silu(x: F64) -> F64:
    return x / (1.0 + np.exp(-x))


def hard_sigmoid(x: F64) -> F64:
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def sigmoid(x: F64) -> F64:
    return 1.0 / (1.0 + np.exp(-x))


def identity(x: F64) -> F64:
    return x


ACTIVATIONS: dict[str, Callable[[F64], F64]] = {
    "relu": relu,
    "silu": silu,
    "identity": identity,
    "sigmoid": sigmoid,
    "hard_sigmoid": hard_sigmoid,
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
    w = _tensor(p, f"{key}.weight")
    if c.plus_identity:
        w = w + identity_offset(c.out_channels, c.groups, c.kernel)
    return conv2d(x, w, p[f"{key}.bias"] if c.bias else None, c.stride, c.padding, c.dilation, c.groups)


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
        return x * _tensor(p, join_key(prefix, f"{node.name}.weight")).reshape(1, -1, 1, 1)
    if isinstance(node, Act):
        return ACTIVATIONS[node.fn](x)
    if isinstance(node, SE):
        return squeeze_excite(x, node, p, prefix)
    if isinstance(node, Linear):
        key = join_key(prefix, node.name)
        logits: F64 = x @ _tensor(p, f"{key}.weight").T + _tensor(p, f"{key}.bias")
        return logits
    if isinstance(node, GlobalPool):
        return global_pool(x)
    if isinstance(node, Flatten):
        return x.reshape(x.shape[0], -1)
    if isinstance(node, Dropout):
        return x
    if isinstance(node, Rep):
        outs = [chain(x, b, p, prefix) for b in node.branches]
        y = np.concatenate(outs, axis=1) if node.combine == "concat" else sum(outs[1:], outs[0])
        return y if node.bn is None else node_forward(y, node.bn, p, prefix)
    if isinstance(node, Add):
        outs = [chain(x, b, p, prefix) for b in node.branches]
        return sum(outs[1:], outs[0])
    if isinstance(node, Block):
        return chain(x, node.body, p, join_key(prefix, node.name))
    raise ShapeMismatchError(f"the oracle has no rule for {type(node).__name__}")


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
