"""The float64 numpy reference forward: the oracle every backend is compared with.

It runs any spec in train form (every branch computed separately, BN in inference mode) or in
deploy form, from a neutral state. Slow but exact: conv2d is an im2col + matmul in float64.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .schema import Form, join_key, repblock_names
from .specs import (BlockSpec, ModelSpec, RepBlockSpec, RepGhostBottleneckSpec, RepGhostModuleSpec,
                    RepGhostNetSpec, RepVGGSpec)

Params = Mapping[str, np.ndarray]


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: int = 1,
           padding: int = 0, dilation: int = 1, groups: int = 1) -> np.ndarray:
    """NCHW x OIHW (I = C / groups) convolution with symmetric zero padding, in float64."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if cg * groups != c or o % groups:
        raise ValueError(f"conv2d: input {x.shape} does not fit kernel {w.shape} with groups={groups}")
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    s0, s1, s2, s3 = xp.strides
    cols = as_strided(xp, (n, groups, cg, kh, kw, ho, wo),
                      (s0, s1 * cg, s1, s2 * dilation, s3 * dilation, s2 * stride, s3 * stride))
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


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def hard_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


ACTIVATIONS = {"relu": relu, "silu": silu, "identity": lambda x: x}


def linear(x: np.ndarray, p: Params, prefix: str) -> np.ndarray:
    w = np.asarray(p[join_key(prefix, "weight")], np.float64)
    return x @ w.T + np.asarray(p[join_key(prefix, "bias")], np.float64)


def global_pool(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(2, 3), keepdims=True)


def _conv(x: np.ndarray, p: Params, prefix: str, **kw) -> np.ndarray:
    return conv2d(x, p[join_key(prefix, "weight")], p.get(join_key(prefix, "bias")), **kw)


def squeeze_excite(x: np.ndarray, p: Params, prefix: str, down: str = "down", up: str = "up",
                   gate=sigmoid) -> np.ndarray:
    """x * gate(up(relu(down(mean_hw(x)))))."""
    s = relu(_conv(global_pool(x), p, join_key(prefix, down)))
    return x * gate(_conv(s, p, join_key(prefix, up)))


def repblock(x: np.ndarray, b: RepBlockSpec, p: Params, prefix: str, form: Form) -> np.ndarray:
    n = repblock_names(b)
    geo = dict(stride=b.stride, dilation=b.dilation, groups=b.groups)
    if form == "deploy":
        y = _conv(x, p, join_key(prefix, n.reparam), padding=b.padding, **geo)
    else:
        y = batch_norm(_conv(x, p, join_key(prefix, n.dense_conv), padding=b.padding, **geo),
                       p, join_key(prefix, n.dense_bn), b.eps)
        y = y + batch_norm(_conv(x, p, join_key(prefix, n.one_conv), padding=b.padding_1x1, **geo),
                           p, join_key(prefix, n.one_bn), b.eps)
        if b.has_identity:
            y = y + batch_norm(x, p, join_key(prefix, n.identity), b.eps)
    act = ACTIVATIONS[b.act]
    if b.se == "pre":
        return act(squeeze_excite(y, p, join_key(prefix, "se")))
    if b.se == "post":
        return squeeze_excite(act(y), p, join_key(prefix, "post_se"))
    return act(y)


def ghost_module(x: np.ndarray, m: RepGhostModuleSpec, p: Params, prefix: str, form: Form) -> np.ndarray:
    x1 = batch_norm(_conv(x, p, join_key(prefix, "primary_conv.0"), stride=m.stride,
                          padding=m.kernel_size // 2), p, join_key(prefix, "primary_conv.1"), m.eps)
    if m.relu:
        x1 = relu(x1)
    geo = dict(padding=m.dw_size // 2, groups=m.out_channels)
    if form == "deploy":
        x2 = _conv(x1, p, join_key(prefix, "cheap_operation"), **geo)
    else:
        x2 = batch_norm(_conv(x1, p, join_key(prefix, "cheap_operation.0"), **geo), p,
                        join_key(prefix, "cheap_operation.1"), m.eps)
        if m.reparam_bn:
            x2 = x2 + batch_norm(x1, p, join_key(prefix, "fusion_bn.0"), m.eps)
    return relu(x2) if m.relu else x2


def ghost_bottleneck(x: np.ndarray, b: RepGhostBottleneckSpec, p: Params, prefix: str,
                     form: Form) -> np.ndarray:
    pad = (b.dw_kernel_size - 1) // 2
    y = ghost_module(x, b.ghost1, p, join_key(prefix, "ghost1"), form)
    if b.stride > 1:
        y = batch_norm(_conv(y, p, join_key(prefix, "conv_dw"), stride=b.stride, padding=pad,
                             groups=b.mid_channels), p, join_key(prefix, "bn_dw"), b.eps)
    if b.se_channels:
        y = squeeze_excite(y, p, join_key(prefix, "se"), "conv_reduce", "conv_expand", hard_sigmoid)
    y = ghost_module(y, b.ghost2, p, join_key(prefix, "ghost2"), form)
    if not b.has_conv_shortcut:
        return y + x
    s = batch_norm(_conv(x, p, join_key(prefix, "shortcut.0"), stride=b.stride, padding=pad,
                         groups=b.in_channels), p, join_key(prefix, "shortcut.1"), b.eps)
    s = batch_norm(_conv(s, p, join_key(prefix, "shortcut.2")), p, join_key(prefix, "shortcut.3"),
                   b.eps)
    return y + s


def forward(spec: ModelSpec, state: Params, x: np.ndarray, form: Form) -> np.ndarray:
    """Logits of the model (main head only) for an NCHW input, in float64."""
    x = np.asarray(x, np.float64)
    if isinstance(spec, RepVGGSpec):
        for prefix, b in spec.blocks():
            x = repblock(x, b, state, prefix, form)
        return linear(global_pool(x)[:, :, 0, 0], state, "linear")
    assert isinstance(spec, RepGhostNetSpec)
    x = relu(batch_norm(_conv(x, state, "conv_stem", stride=2, padding=1), state, "bn1", spec.eps))
    for i, stage in enumerate(spec.stages):
        for j, b in enumerate(stage):
            x = ghost_bottleneck(x, b, state, f"blocks.{i}.{j}", form)
    x = relu(batch_norm(_conv(x, state, f"{spec.last_prefix}.conv"), state,
                        f"{spec.last_prefix}.bn1", spec.eps))
    x = relu(_conv(global_pool(x), state, "conv_head"))
    return linear(x[:, :, 0, 0], state, "classifier")


def block_forward(spec: BlockSpec, params: Params, x: np.ndarray, form: Form) -> np.ndarray:
    """One block on NCHW x, from block-relative keys, in float64."""
    x = np.asarray(x, np.float64)
    if isinstance(spec, RepBlockSpec):
        return repblock(x, spec, params, "", form)
    if isinstance(spec, RepGhostModuleSpec):
        return ghost_module(x, spec, params, "", form)
    return ghost_bottleneck(x, spec, params, "", form)
