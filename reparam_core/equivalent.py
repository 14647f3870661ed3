"""Equivalent (kernel, bias) of each re-parameterizable block, from its canonical weights.

Backends call these with the numpy values of one block (keys relative to the block, canonical
names) and build their native deploy conv from the result; `reparameterize_state` applies them to
a whole neutral state, so conversion needs no framework at all.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import numpy as np

from .errors import FusionError
from .fusion import KernelBias, fuse_bn, fuse_conv_bn, identity_kernel, sum_branches
from .schema import repblock_names, state_schema
from .specs import (ModelSpec, RepBlockSpec, RepGhostModuleSpec, RepGhostNetSpec, RepVGGSpec)

Params = Mapping[str, np.ndarray]


def _bn_params(params: Params, bn: str) -> tuple[np.ndarray, ...]:
    """gamma, beta, running mean and running var of the BN module `bn`."""
    return tuple(params[f"{bn}.{f}"] for f in ("weight", "bias", "running_mean", "running_var"))


def _conv_bn(params: Params, conv: str, bn: str, eps: float) -> KernelBias:
    return fuse_conv_bn(params[f"{conv}.weight"], *_bn_params(params, bn), eps,
                        bias=params.get(f"{conv}.bias"))


def _bn(params: Params, bn: str, eps: float, groups: int, k: int) -> KernelBias:
    return fuse_bn(*_bn_params(params, bn), eps, groups, k)


CHUNK_ELEMENTS = 1 << 18  # kernel elements fused per step: the float64 temporaries stay in cache
_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    """A forked child has none of the parent's threads: it starts a pool of its own."""
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def _map_rows(fn: Callable[[slice], None], n: int, step: int) -> None:
    """fn(rows) for consecutive slices of range(n), `step` long, on a small thread pool when
    there are several (numpy releases the GIL inside each slice's arithmetic)."""
    slices = [slice(i, min(i + step, n)) for i in range(0, n, step)]
    if len(slices) == 1:
        fn(slices[0])
        return
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                   thread_name_prefix="reparam-fuse")
    for _ in _POOL.map(fn, slices):  # re-raises the first error of any slice
        pass


def _output_rows(params: Params, modules: set[str], out_channels: int
                 ) -> dict[str, np.ndarray]:
    """The tensors of `modules` (conv weights/biases, BN vectors: output channels first),
    checked to have `out_channels` rows."""
    out = {k: np.asarray(v) for k, v in params.items() if k.rsplit(".", 1)[0] in modules}
    for k, v in out.items():
        if v.ndim == 0 or v.shape[0] != out_channels:
            raise FusionError(f"{k} has shape {tuple(v.shape)}; the block has {out_channels} "
                              "output channels")
    return out


def repblock_kernel_bias(spec: RepBlockSpec, params: Params) -> KernelBias:
    """K = fuse(dense) + pad(fuse(1x1)) + identity_kernel * BN_id, b = sum of the fused biases.

    The 1x1 branch sits on the centre tap (its padding is spec.padding_1x1, which accounts for
    dilation) and the identity kernel is correct for any groups. Computed in float64 one slice
    of output channels at a time (each output channel depends on its own rows only; slices run
    on a few threads) and rounded once to the dense kernel's dtype, so large kernels fuse at
    about the speed of a copy."""
    n = repblock_names(spec)
    dense = np.asarray(params[f"{n.dense_conv}.weight"])
    out_channels = dense.shape[0]
    tensors = _output_rows(params, {n.dense_conv, n.dense_bn, n.one_conv, n.one_bn, n.identity},
                           out_channels)
    dt = dense.dtype if np.issubdtype(dense.dtype, np.floating) else np.dtype(np.float64)
    kernel, bias = np.empty(dense.shape, dt), np.empty(out_channels, dt)
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(dense.shape[1:])))

    def fuse_rows(rows: slice) -> None:
        p = {k: np.asarray(v[rows], np.float64) for k, v in tensors.items()}
        branches = [_conv_bn(p, n.dense_conv, n.dense_bn, spec.eps),
                    _conv_bn(p, n.one_conv, n.one_bn, spec.eps)]
        if spec.has_identity:
            ident = identity_kernel(out_channels, spec.groups, 1, rows=rows)  # centred below
            branches.append(fuse_conv_bn(ident, *_bn_params(p, n.identity), spec.eps))
        kernel[rows], bias[rows] = sum_branches(branches)

    _map_rows(fuse_rows, out_channels, step)
    return kernel, bias


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
