"""The float64 numpy reference forward: the oracle every backend is compared with.

It evaluates any description (reparam_core.nodes) in the form it is in: in train form every
branch is computed separately (BN in inference mode), in deploy form the fused convs. One rule
per node type below. Slow but exact: conv2d is an im2col + matmul in float64.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .errors import ShapeMismatchError
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


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
           stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
           dilation: int | tuple[int, int] = 1, groups: int = 1) -> np.ndarray:
    """NCHW x OIHW (I = C / groups) convolution with symmetric zero padding, in float64."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if cg * groups != c or o % groups:
        raise ShapeMismatchError(f"conv2d: input {x.shape} does not fit kernel {w.shape} with "
                                 f"groups={groups}")
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = xp.strides
    cols = as_strided(xp, (n, groups, cg, kh, kw, ho, wo),
                      (s0, s1 * cg, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw))
    wg = w.reshape(groups, o // groups, cg * kh * kw)
    cols = cols.reshape(n, groups, cg * kh * kw, ho * wo)
    out = np.matmul(wg[None], cols).reshape(n, o, ho, wo)
    if b is not None:
        out = out + np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return out


def batch_norm(x: np.ndarray, p: Params, prefix: str, eps: float) -> np.ndarray:
    """Inference BN: gamma (x - mean) / sqrt(var + eps) + beta, per channel."""
    r = lambda f: np.asarray(p[join_key(prefix, f)], np.float64).reshape(1, -1, 1, 1)  # noqa: E731
    return (x - r("running_mean")) / np.sqrt(r("running_var") + eps) * r("weight") + r("bias")


def bn_of_zero(p: Params, prefix: str, eps: float) -> np.ndarray:
    """BN(0) per channel: beta - mean gamma / sqrt(var + eps) (what PadBN pads with)."""
    r = lambda f: np.asarray(p[join_key(prefix, f)], np.float64)  # noqa: E731
    return r("bias") - r("running_mean") * r("weight") / np.sqrt(r("running_var") + eps)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def hard_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


ACTIVATIONS = {"relu": relu, "silu": silu, "identity": lambda x: x, "sigmoid": sigmoid,
               "hard_sigmoid": hard_sigmoid}


def avg_pool(x: np.ndarray, k: int, stride: int, padding: int) -> np.ndarray:
    """k x k average pooling with zero padding counted (count_include_pad)."""
    c = x.shape[1]
    w = np.full((c, 1, k, k), 1.0 / (k * k))
    return conv2d(x, w, stride=stride, padding=padding, groups=c)


def global_pool(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(2, 3), keepdims=True)


def _tensor(p: Params, key: str) -> np.ndarray:
    return np.asarray(p[key], np.float64)


def conv_node(x: np.ndarray, c: Conv, p: Params, prefix: str) -> np.ndarray:
    """A Conv node; a plus_identity conv applies its stored weight + identity_offset."""
    key = join_key(prefix, c.name)
    w = _tensor(p, f"{key}.weight")
    if c.plus_identity:
        w = w + identity_offset(c.out_channels, c.groups, c.kernel)
    return conv2d(x, w, p[f"{key}.bias"] if c.bias else None, c.stride, c.padding, c.dilation,
                  c.groups)


def squeeze_excite(x: np.ndarray, se: SE, p: Params, prefix: str) -> np.ndarray:
    """x * gate(expand(relu(reduce(mean_hw(x)))))."""
    key = join_key(prefix, se.name)
    s = relu(conv_node(global_pool(x), Conv(se.reduce, se.channels, se.hidden, bias=True), p, key))
    s = conv_node(s, Conv(se.expand, se.hidden, se.channels, bias=True), p, key)
    return x * ACTIVATIONS[se.gate](s)


def chain(x: np.ndarray, nodes: tuple[Node, ...], p: Params, prefix: str) -> np.ndarray:
    for n in nodes:
        x = node_forward(x, n, p, prefix)
    return x


def node_forward(x: np.ndarray, node: Node, p: Params, prefix: str = "") -> np.ndarray:
    """One node on NCHW x (float64), its tensors at `prefix.<name>.<field>` in p."""
    if isinstance(node, Conv):
        return conv_node(x, node, p, prefix)
    if isinstance(node, BN):
        return batch_norm(x, p, join_key(prefix, node.name), node.eps)
    if isinstance(node, PadBN):
        key = join_key(prefix, node.name)
        y = batch_norm(x, p, key, node.eps)
        q = node.pad
        out = np.broadcast_to(bn_of_zero(p, key, node.eps).reshape(1, -1, 1, 1),
                              (y.shape[0], y.shape[1], y.shape[2] + 2 * q, y.shape[3] + 2 * q)).copy()
        out[:, :, q:q + y.shape[2], q:q + y.shape[3]] = y
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
        return x @ _tensor(p, f"{key}.weight").T + _tensor(p, f"{key}.bias")
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


def forward(spec: SpecLike, state: Params, x: np.ndarray, form: Form) -> np.ndarray:
    """Logits of the model (main head only) for an NCHW input, in float64."""
    desc = in_form(spec, form)
    return chain(np.asarray(x, np.float64), desc.body, state, "")


def forward_with_aux(spec: SpecLike, state: Params, x: np.ndarray) -> dict[str, np.ndarray]:
    """Train form: the main logits ("main") and every auxiliary head's, in float64."""
    desc = in_form(spec, "train")
    taps = {a.tap: a for a in desc.aux} if isinstance(desc, Model) else {}
    out: dict[str, np.ndarray] = {}
    y = np.asarray(x, np.float64)
    for n in desc.body:
        y = node_forward(y, n, state)
        if isinstance(n, Block) and n.name in taps:
            aux = taps[n.name]
            out[aux.name] = chain(y, aux.body, state, "")
    return {"main": y, **out}


def block_forward(spec: SpecLike, params: Params, x: np.ndarray, form: Form) -> np.ndarray:
    """One block on NCHW x, from block-relative keys, in float64."""
    return forward(spec, params, x, form)
