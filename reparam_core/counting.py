"""Parameter and multiply-accumulate counts from a spec alone, no framework needed."""
from __future__ import annotations

import math

from .schema import Form, state_schema
from .specs import ModelSpec, RepBlockSpec, RepGhostNetSpec, RepGhostModuleSpec, RepVGGSpec


def count_params(spec: ModelSpec, form: Form) -> int:
    """Learnable parameters (BN running statistics excluded), as the official tables count."""
    return sum(math.prod(t.shape) for t in state_schema(spec, form).values() if t.learnable)


def count_params_folded(spec: ModelSpec) -> int:
    """Deploy parameters when every remaining conv+BN pair is folded too (RepGhostNet keeps the
    BN after each primary conv in its official deploy form; folding it turns gamma, beta into a
    bias). Equal to count_params(spec, 'deploy') for RepVGG, which has no such pairs."""
    schema = state_schema(spec, "deploy")
    bn_channels = sum(t.shape[0] for k, t in schema.items() if t.kind == "bn.weight")
    return count_params(spec, "deploy") - bn_channels  # 2C (gamma, beta) become C (bias)


def _out(size: int, k: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _conv_macs(hw: int, cin: int, cout: int, k: int, groups: int = 1) -> int:
    return hw * cout * (cin // groups) * k * k


def _repblock_macs(b: RepBlockSpec, h: int, w: int, form: Form) -> tuple[int, int, int]:
    ho = _out(h, b.kernel_size, b.stride, b.padding, b.dilation)
    wo = _out(w, b.kernel_size, b.stride, b.padding, b.dilation)
    macs = _conv_macs(ho * wo, b.in_channels, b.out_channels, b.kernel_size, b.groups)
    if form == "train":
        macs += _conv_macs(ho * wo, b.in_channels, b.out_channels, 1, b.groups)
    if b.se != "none":
        macs += 2 * b.out_channels * b.se_channels
    return macs, ho, wo


def _ghost_macs(m: RepGhostModuleSpec, hw: int) -> int:
    return (_conv_macs(hw, m.in_channels, m.out_channels, m.kernel_size)
            + _conv_macs(hw, m.out_channels, m.out_channels, m.dw_size, m.out_channels))


def count_macs(spec: ModelSpec, form: Form, size: int = 224) -> int:
    """Multiply-accumulates of convs and linears at a size x size input (BN, activations and
    the identity branch count as zero)."""
    h = w = size
    total = 0
    if isinstance(spec, RepVGGSpec):
        for _, b in spec.blocks():
            m, h, w = _repblock_macs(b, h, w, form)
            total += m
        return total + spec.num_features * spec.num_classes
    assert isinstance(spec, RepGhostNetSpec)
    h, w = _out(h, 3, 2, 1), _out(w, 3, 2, 1)
    total += _conv_macs(h * w, 3, spec.stem_channels, 3)
    for stage in spec.stages:
        for b in stage:
            total += _ghost_macs(b.ghost1, h * w)
            pad = (b.dw_kernel_size - 1) // 2
            ho, wo = _out(h, b.dw_kernel_size, b.stride, pad), _out(w, b.dw_kernel_size, b.stride, pad)
            if b.stride > 1:
                total += _conv_macs(ho * wo, b.mid_channels, b.mid_channels, b.dw_kernel_size,
                                    b.mid_channels)
            if b.se_channels:
                total += 2 * b.mid_channels * b.se_channels
            total += _ghost_macs(b.ghost2, ho * wo)
            if b.has_conv_shortcut:
                total += _conv_macs(ho * wo, b.in_channels, b.in_channels, b.dw_kernel_size,
                                    b.in_channels)
                total += _conv_macs(ho * wo, b.in_channels, b.out_channels, 1)
            h, w = ho, wo
    total += _conv_macs(h * w, spec.last_in_channels, spec.last_channels, 1)
    total += spec.last_channels * spec.head_channels + spec.head_channels * spec.num_classes
    return total
