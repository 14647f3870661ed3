"""Equivalent (kernel, bias) of each re-parameterizable block, from its canonical weights.

Backends call these with the numpy values of one block (keys relative to the block, canonical
names) and build their native deploy conv from the result; `reparameterize_state` applies them to
a whole neutral state, so conversion needs no framework at all.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .fusion import KernelBias, fuse_bn, fuse_conv_bn, sum_branches
from .schema import repblock_names, state_schema
from .specs import (ModelSpec, RepBlockSpec, RepGhostModuleSpec, RepGhostNetSpec, RepVGGSpec)

Params = Mapping[str, np.ndarray]


def _conv_bn(params: Params, conv: str, bn: str, eps: float) -> KernelBias:
    return fuse_conv_bn(params[f"{conv}.weight"], params[f"{bn}.weight"], params[f"{bn}.bias"],
                        params[f"{bn}.running_mean"], params[f"{bn}.running_var"], eps,
                        bias=params.get(f"{conv}.bias"))


def _bn(params: Params, bn: str, eps: float, groups: int, k: int) -> KernelBias:
    return fuse_bn(params[f"{bn}.weight"], params[f"{bn}.bias"], params[f"{bn}.running_mean"],
                   params[f"{bn}.running_var"], eps, groups, k)


def repblock_kernel_bias(spec: RepBlockSpec, params: Params) -> KernelBias:
    """K = fuse(dense) + pad(fuse(1x1)) + identity_kernel * BN_id, b = sum of the fused biases.

    The 1x1 branch sits on the centre tap (its padding is spec.padding_1x1, which accounts for
    dilation) and the identity kernel is correct for any groups."""
    n = repblock_names(spec)
    branches = [_conv_bn(params, n.dense_conv, n.dense_bn, spec.eps),
                _conv_bn(params, n.one_conv, n.one_bn, spec.eps)]
    if spec.has_identity:
        branches.append(_bn(params, n.identity, spec.eps, spec.groups, spec.kernel_size))
    return sum_branches(branches)


def ghost_cheap_kernel_bias(spec: RepGhostModuleSpec, params: Params) -> KernelBias:
    """RepGhost: depthwise conv+BN plus the BN shortcut on the same input, as one depthwise conv."""
    c = spec.out_channels
    branches = [_conv_bn(params, "cheap_operation.0", "cheap_operation.1", spec.eps)]
    if spec.reparam_bn:
        branches.append(_bn(params, "fusion_bn.0", spec.eps, c, spec.dw_size))
    return sum_branches(branches)


def _sub(state: Params, prefix: str) -> dict[str, np.ndarray]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def reparameterize_state(spec: ModelSpec, state: Params) -> dict[str, np.ndarray]:
    """A train-form neutral state -> the deploy-form state of the same function (float64 algebra,
    returned in the input dtype). Tensors that are not fused are passed through unchanged."""
    deploy = state_schema(spec, "deploy")
    out: dict[str, np.ndarray] = {}
    fused: dict[str, tuple[str, KernelBias]] = {}
    if isinstance(spec, RepVGGSpec):
        for prefix, b in spec.blocks():
            fused[f"{prefix}.{repblock_names(b).reparam}"] = (
                prefix, repblock_kernel_bias(b, _sub(state, prefix)))
    else:
        assert isinstance(spec, RepGhostNetSpec)
        for i, stage in enumerate(spec.stages):
            for j, b in enumerate(stage):
                for name, m in (("ghost1", b.ghost1), ("ghost2", b.ghost2)):
                    prefix = f"blocks.{i}.{j}.{name}"
                    fused[f"{prefix}.cheap_operation"] = (
                        prefix, ghost_cheap_kernel_bias(m, _sub(state, prefix)))
    for key in deploy:
        module, field = key.rsplit(".", 1)
        if module in fused:
            k, b = fused[module][1]
            out[key] = k if field == "weight" else b
        else:
            out[key] = state[key]
    return out


def custom_l2_penalty(k3: Any, centre: Any, k1: Any, t3: Any, t1: Any,
                      identity: Any = None, tid: Any = None) -> Any:
    """RepVGGplus' custom L2 of one block, on the equivalent kernel, identity branch included
    (the official code leaves it out):

        L2 = (sum K3^2 - sum K3c^2) + sum (K3c t3 + K1 t1 + I tid)^2 / (t3^2 + t1^2 + I tid^2)

    K3c is the dense kernel's centre tap, I the identity kernel (1 on the identity taps) and each
    t = gamma / sqrt(var + eps), detached. Written with arithmetic and `.sum()` only, so every
    backend calls it on its own (differentiable) arrays, in its own layout, with the t's
    reshaped to broadcast over the output axis."""
    circle = (k3 ** 2).sum() - (centre ** 2).sum()
    eq = centre * t3 + k1 * t1
    den = t3 ** 2 + t1 ** 2
    if identity is not None:
        eq = eq + identity * tid
        den = den + identity * tid ** 2
    return circle + (eq ** 2 / den).sum()
