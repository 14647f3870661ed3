"""Parameter and multiply-accumulate counts from a description alone, no framework needed."""

from __future__ import annotations

import math

from ..errors import ArgumentError
from .fuse import fused_conv
from .nodes import SE, Add, Attention, AvgPool, Block, Conv, GlobalPool, Linear, Node, PadBN, Rep, SpecLike, in_form
from .schema import Form, schema_for

Shape = tuple[int, int, int]  # C, H, W


def count_params(spec: SpecLike, form: Form) -> int:
    """Learnable parameters (BN running statistics excluded), as the official tables count."""
    return sum(math.prod(t.shape) for t in schema_for(spec, form).values() if t.learnable)


def count_params_folded(spec: SpecLike) -> int:
    """Deploy parameters when every remaining conv+BN pair is folded too (RepGhostNet keeps the
    BN after each primary conv in its official deploy form; folding it turns gamma, beta into a
    bias). Equal to count_params(spec, 'deploy') for RepVGG, which has no such pairs."""
    schema = schema_for(spec, "deploy")
    bn_channels = sum(t.shape[0] for t in schema.values() if t.kind == "bn.weight")
    return count_params(spec, "deploy") - bn_channels  # 2C (gamma, beta) become C (bias)


def _out(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _conv_out(c: Conv, shape: Shape) -> Shape:
    _, h, w = shape
    return (
        c.out_channels,
        _out(h, c.kernel[0], c.stride[0], c.padding[0], c.dilation[0]),
        _out(w, c.kernel[1], c.stride[1], c.padding[1], c.dilation[1]),
    )


def node_macs(node: Node, shape: Shape) -> tuple[int, Shape]:
    """Multiply-accumulates of a node on a C x H x W input (N x C is C x 1 x 1), and its output
    shape. Convs, linears and attention count:

        conv       H_out W_out C_out C_in/groups kh kw
        linear     H W in out (pointwise over the positions; H = W = 1 for a classifier)
        attention  T C 3C (qkv) + 2 T T C (q k^T, then a v) + T C C (proj), T = H W

    BN, layer norm, GRN, per-channel scales and biases, pooling, activations and identity
    branches count zero (a train-form Rep: its branches' MACs; deploy form: the fused conv's)."""
    if isinstance(node, Conv):
        out = _conv_out(node, shape)
        return out[1] * out[2] * node.out_channels * (node.in_channels // node.groups) * node.kernel[0] * node.kernel[
            1
        ], out
    if isinstance(node, SE):
        return 2 * node.channels * node.hidden, shape
    if isinstance(node, Linear):
        _, h, w = shape
        return h * w * node.in_features * node.out_features, (node.out_features, h, w)
    if isinstance(node, Attention):
        c, h, w = shape
        t = h * w
        return t * c * 3 * c + 2 * t * t * c + t * c * c, shape
    if isinstance(node, AvgPool):
        c, h, w = shape
        return 0, (
            c,
            _out(h, node.kernel, node.stride, node.padding, 1),
            _out(w, node.kernel, node.stride, node.padding, 1),
        )
    if isinstance(node, PadBN):
        c, h, w = shape
        return 0, (c, h + 2 * node.pad, w + 2 * node.pad)
    if isinstance(node, Rep):
        total = 0
        for branch in node.branches:
            macs, _ = chain_macs(branch, shape)
            total += macs
        return total, _conv_out(fused_conv(node), shape)
    if isinstance(node, Add):
        results = [chain_macs(b, shape) for b in node.branches]
        return sum(m for m, _ in results), results[0][1]
    if isinstance(node, Block):
        return chain_macs(node.body, shape)
    if isinstance(node, GlobalPool):
        return 0, (shape[0], 1, 1)
    return 0, shape


def chain_macs(nodes: tuple[Node, ...], shape: Shape) -> tuple[int, Shape]:
    total = 0
    for n in nodes:
        macs, shape = node_macs(n, shape)
        total += macs
    return total, shape


def count_macs(spec: SpecLike, form: Form, size: int = 224) -> int:
    """Multiply-accumulates of the main path (auxiliary heads excluded) at a size x size RGB
    input (BN, activations, pooling and identity branches count as zero). ArgumentError for a
    size below 1."""
    if size < 1:
        raise ArgumentError(f"input size must be >= 1, got {size}")
    return chain_macs(in_form(spec, form).body, (3, size, size))[0]


def conv_depth(spec: SpecLike) -> int:
    """Convs on the longest path of the deploy form before its global pool (the head and SE
    convs do not count): the depth that float32 rounding errors compound over."""

    def depth(nodes: tuple[Node, ...]) -> tuple[int, bool]:
        total = 0
        for n in nodes:
            if isinstance(n, GlobalPool):
                return total, True
            if isinstance(n, Conv):
                total += 1
            elif isinstance(n, Block):
                d, stop = depth(n.body)
                total += d
                if stop:
                    return total, True
            elif isinstance(n, Add):
                total += max(depth(b)[0] for b in n.branches)
        return total, False

    return depth(in_form(spec, "deploy").body)[0]
