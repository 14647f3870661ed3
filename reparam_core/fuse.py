"""The fusion rule of the block description: the equivalent (kernel, bias) of any `Rep` node.

A branch is a chain of primitives read left to right; each primitive maps the affine conv
(K, b) computed so far (the identity when nothing came before) to a new one:

    Conv W, c      first: (W, c);  after a 1x1 stage (K1, b1): fuse_1x1_kxk  (transform III)
    AvgPool k      the conv avg_pool_kernel(C, k, groups), composed the same way
    BN / PadBN     K' = K t[o],  b' = beta + t (b - mean),  t = gamma / sqrt(var + eps)
    Scale s        K' = K s[o],  b' = b s
    (nothing)      the identity kernel of the fused conv's groups, bias 0

The branches are then centred in the fused kernel and summed (or concatenated over output
channels), and a BN after the sum folds in last. `check_rep` refuses every description where
this is not exactly the function of the branches (alignment, strides, groups, padding that a
bias would leak into). Everything is computed in float64 and rounded once.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np

from .errors import FusionError
from .fusion import KernelBias, bn_scale, fuse_1x1_kxk, identity_kernel
from .schema import node_schema, schema_of
from .nodes import (BN, AvgPool, Branch, Conv, Description, Pair, PadBN, Rep, Scale, in_form,
                    join_key, pair, reps)

Params = Mapping[str, np.ndarray]

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")

# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Geometry:
    """What a branch computes, as one conv: kernel, stride, padding, dilation."""

    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair


def _branch_geometry(branch: Branch, rep: Rep, index: int) -> tuple[_Geometry | None, int]:
    """The geometry of a branch (None for a parameter-free identity) and its output channels;
    raises FusionError when the chain is not exactly one conv."""
    f = rep.fused
    where = f"branch {index} of the Rep fused into {f.name!r}"
    channels = f.in_channels
    geo: _Geometry | None = None
    bias_so_far = False  # the value a zero-padded input produces at this point is not 0
    pending_pad = 0
    for node in branch:
        if isinstance(node, (Conv, AvgPool)):
            kernel, stride, padding = ((node.kernel, node.stride, node.padding)
                                       if isinstance(node, Conv) else
                                       (pair(node.kernel), pair(node.stride), pair(node.padding)))
            dilation = node.dilation if isinstance(node, Conv) else (1, 1)
            if isinstance(node, Conv):
                if node.in_channels != channels:
                    raise FusionError(f"{where}: conv {node.name!r} reads {node.in_channels} "
                                      f"channels, the branch has {channels} there")
                if node.groups != f.groups:
                    raise FusionError(f"{where}: conv {node.name!r} has groups={node.groups}, "
                                      f"the fused conv groups={f.groups}")
                channels = node.out_channels
            if geo is not None:
                if geo.kernel != (1, 1) or geo.stride != (1, 1) or geo.padding != (0, 0):
                    raise FusionError(f"{where}: only a 1x1, stride-1, unpadded stage can come "
                                      "before another conv or pool in a branch")
                if padding != (0, 0) and bias_so_far:
                    raise FusionError(f"{where}: the padding of the second stage would pad a "
                                      "biased value with zeros; put a PadBN before it")
            if pending_pad and padding != (0, 0):
                raise FusionError(f"{where}: a PadBN pads already; the stage after it must have "
                                  "padding 0")
            geo = _Geometry(kernel, stride, (padding[0] + pending_pad, padding[1] + pending_pad),
                            dilation)
            pending_pad = 0
            bias_so_far = bias_so_far or (isinstance(node, Conv) and node.bias)
        elif isinstance(node, (BN, PadBN, Scale)):
            if node.channels != channels:
                raise FusionError(f"{where}: {type(node).__name__} {node.name!r} has "
                                  f"{node.channels} channels, the branch has {channels} there")
            if isinstance(node, PadBN):
                if bias_so_far:
                    raise FusionError(f"{where}: PadBN {node.name!r} must follow a bias-free "
                                      "stage (it pads with BN(0))")
                pending_pad += node.pad
            bias_so_far = bias_so_far or isinstance(node, (BN, PadBN))
        else:
            raise FusionError(f"{where}: {type(node).__name__} is not a branch primitive")
    if pending_pad:
        raise FusionError(f"{where}: a PadBN must be followed by a conv or pool")
    return geo, channels


def _check_alignment(geo: _Geometry | None, rep: Rep, index: int) -> None:
    f = rep.fused
    where = f"branch {index} of the Rep fused into {f.name!r}"
    if geo is None:  # identity: the centre tap must read x at the output pixel
        if f.in_channels != f.out_channels or f.stride != (1, 1):
            raise FusionError(f"{where}: an identity branch needs in == out channels and stride "
                              f"1, got {f.in_channels} -> {f.out_channels}, stride {f.stride}")
        geo = _Geometry((1, 1), (1, 1), (0, 0), f.dilation)
    if geo.stride != f.stride:
        raise FusionError(f"{where}: stride {geo.stride} differs from the fused conv's {f.stride}")
    for axis in (0, 1):
        k, big, d = geo.kernel[axis], f.kernel[axis], f.dilation[axis]
        if k > 1 and geo.dilation[axis] != d:
            raise FusionError(f"{where}: dilation {geo.dilation} differs from the fused conv's "
                              f"{f.dilation}")
        if k > big or (big - k) % 2:
            raise FusionError(f"{where}: a {geo.kernel[0]}x{geo.kernel[1]} kernel cannot be "
                              f"centred in {f.kernel[0]}x{f.kernel[1]}")
        want = f.padding[axis] - d * (big - k) // 2
        if geo.padding[axis] != want:
            raise FusionError(f"{where}: padding {geo.padding} does not line up with the fused "
                              f"{f.kernel[0]}x{f.kernel[1]} conv (padding {f.padding}, dilation "
                              f"{f.dilation}): it must be {want} on axis {axis}")


def check_rep(rep: Rep) -> None:
    """Raise FusionError unless the fused conv computes exactly the sum of the branches."""
    f = rep.fused
    if not rep.branches:
        raise FusionError(f"the Rep fused into {f.name!r} has no branch")
    outs = []
    for i, branch in enumerate(rep.branches):
        geo, channels = _branch_geometry(branch, rep, i)
        _check_alignment(geo, rep, i)
        outs.append(channels)
    total = sum(outs) if rep.combine == "concat" else None
    if rep.combine == "sum" and any(c != f.out_channels for c in outs):
        raise FusionError(f"the branches of {f.name!r} give {outs} channels; the fused conv "
                          f"has {f.out_channels}")
    if rep.combine == "concat" and (total != f.out_channels or f.groups != 1):
        raise FusionError(f"the concatenated branches of {f.name!r} give {total} channels "
                          f"(groups {f.groups}); the fused conv has {f.out_channels}, groups 1")
    if rep.bn is not None and rep.bn.channels != f.out_channels:
        raise FusionError(f"the BN {rep.bn.name!r} after the sum has {rep.bn.channels} channels; "
                          f"the fused conv has {f.out_channels}")


# --------------------------------------------------------------------------- the rule

def _bn_rows(params: Params, prefix: str, name: str, rows: slice) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(params[join_key(prefix, f"{name}.{f}")][rows], np.float64)
                 for f in BN_FIELDS)


def _fold_bn(k: np.ndarray, b: np.ndarray, bn: tuple[np.ndarray, ...], eps: float) -> KernelBias:
    gamma, beta, mean, var = bn
    t = bn_scale(gamma, var, eps)
    return k * t.reshape(-1, 1, 1, 1), beta + t * (b - mean)


def _avg_kernel(channels: int, k: int, groups: int, rows: slice) -> np.ndarray:
    ident = identity_kernel(channels, groups, 1, rows=rows)
    return np.tile(ident, (1, 1, k, k)) / float(k * k)


def _row_separable(branch: Branch) -> bool:
    """Whether each output channel of the branch depends on its own rows only (at most one
    conv or pool, and it comes first)."""
    stages = [i for i, n in enumerate(branch) if isinstance(n, (Conv, AvgPool))]
    return stages in ([], [0])


def _check_shape(a: np.ndarray, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(a.shape) != shape:
        raise FusionError(f"{key} has shape {tuple(a.shape)}; the description needs {shape}")
    return a


def _param(params: Params, key: str, shape: tuple[int, ...], rows: slice) -> np.ndarray:
    if key not in params:
        raise FusionError(f"missing tensor {key} for the fusion")
    a = np.asarray(params[key])
    _check_shape(a, key, shape)
    return np.asarray(a[rows], np.float64)


def _compose(kb: KernelBias | None, w: np.ndarray, c: np.ndarray, groups: int,
             rows: slice) -> KernelBias:
    """A conv stage (w, c) after what came before: itself first, transform III after a 1x1."""
    if kb is None:
        return w, c
    k, b = fuse_1x1_kxk(kb[0], kb[1], w, c, groups)
    return np.asarray(k[rows], np.float64), np.asarray(b[rows], np.float64)


def branch_kernel_bias(branch: Branch, rep: Rep, params: Params, prefix: str = "",
                       rows: slice = slice(None)) -> KernelBias:
    """The (kernel, bias) of one branch in float64, output channels `rows` only (rows must be
    all for a branch that is not row-separable). Kernel (rows, C/g, kh, kw) unpadded."""
    f = rep.fused
    kb: KernelBias | None = None
    channels = f.in_channels
    for node in branch:
        if isinstance(node, Conv):
            shape = (node.out_channels, node.in_channels // node.groups, *node.kernel)
            r = rows if kb is None else slice(None)
            w = _param(params, join_key(prefix, f"{node.name}.weight"), shape, r)
            c = (_param(params, join_key(prefix, f"{node.name}.bias"), (node.out_channels,), r)
                 if node.bias else np.zeros(w.shape[0]))
            kb = _compose(kb, w, c, f.groups, rows)
            channels = node.out_channels
        elif isinstance(node, AvgPool):
            w = _avg_kernel(channels, node.kernel, f.groups, rows if kb is None else slice(None))
            kb = _compose(kb, w, np.zeros(w.shape[0]), f.groups, rows)
        else:
            k, b = kb if kb is not None else _identity(channels, f.groups, rows)
            if isinstance(node, (BN, PadBN)):
                kb = _fold_bn(k, b, _bn_rows(params, prefix, node.name, rows), node.eps)
            else:
                s = _param(params, join_key(prefix, f"{node.name}.weight"), (node.channels,), rows)
                kb = k * s.reshape(-1, 1, 1, 1), b * s
    return kb if kb is not None else _identity(channels, f.groups, rows)


def _identity(channels: int, groups: int, rows: slice) -> KernelBias:
    k = identity_kernel(channels, groups, 1, rows=rows)
    return k, np.zeros(k.shape[0])


def _add_centred(total: np.ndarray, k: np.ndarray) -> None:
    """total[:, :, centred window] += k (kernel sizes differ by even amounts, checked before)."""
    ph = (total.shape[2] - k.shape[2]) // 2
    pw = (total.shape[3] - k.shape[3]) // 2
    total[:, :, ph:ph + k.shape[2], pw:pw + k.shape[3]] += k


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


def _result_dtype(rep: Rep, params: Params, prefix: str) -> np.dtype:
    """The dtype of the Rep's first conv weight (of its first tensor when it has no conv;
    float32 when it has no tensor at all)."""
    schema: dict = {}
    for node in _rep_nodes(rep):
        schema.update(node_schema(node, prefix))
    present = [k for k in schema if k in params]
    convs = [k for k in present if schema[k].kind == "conv.weight"]
    if not present:
        return np.dtype(np.float32)
    dt = np.asarray(params[(convs or present)[0]]).dtype
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


def rep_kernel_bias(rep: Rep, params: Params, prefix: str = "") -> KernelBias:
    """The (kernel OIHW, bias) of the fused conv of `rep`, from the tensors in `params` (keys
    `prefix.<name>.<field>`), in float64 one slice of output channels at a time on a few
    threads (row-separable branches), rounded once to the dtype of its first conv weight."""
    f = rep.fused
    out_ch = f.out_channels
    shape = (out_ch, f.in_channels // f.groups, *f.kernel)
    dt = _result_dtype(rep, params, prefix)
    kernel, bias = np.empty(shape, dt), np.empty(out_ch, dt)
    if rep.combine == "concat":
        start = 0
        for branch in rep.branches:
            k, b = branch_kernel_bias(branch, rep, params, prefix)
            window = np.zeros((k.shape[0], *shape[1:]))
            _add_centred(window, k)
            kernel[start:start + k.shape[0]], bias[start:start + k.shape[0]] = window, b
            start += k.shape[0]
        return kernel, bias
    whole = [branch_kernel_bias(br, rep, params, prefix) for br in rep.branches
             if not _row_separable(br)]
    separable = [br for br in rep.branches if _row_separable(br)]
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))

    def fuse_rows(rows: slice) -> None:
        n = len(range(out_ch)[rows])
        k_tot, b_tot = np.zeros((n, *shape[1:])), np.zeros(n)
        for br in separable:
            k, b = branch_kernel_bias(br, rep, params, prefix, rows)
            _add_centred(k_tot, k)
            b_tot += b
        for k, b in whole:
            _add_centred(k_tot, k[rows])
            b_tot += b[rows]
        if rep.bn is not None:
            k_tot, b_tot = _fold_bn(k_tot, b_tot, _bn_rows(params, prefix, rep.bn.name, rows),
                                    rep.bn.eps)
        kernel[rows], bias[rows] = k_tot, b_tot

    _map_rows(fuse_rows, out_ch, step)
    return kernel, bias


# --------------------------------------------------------------------------- whole states

def fused_modules(desc: Description, prefix: str = "") -> dict[str, tuple[str, Rep]]:
    """The deploy conv module path of every Rep -> (the prefix of its block, the Rep)."""
    return {join_key(p, r.fused.name): (p, r) for p, r in reps(desc, prefix)}


def iter_deploy_state(spec: object, get: Callable[[str], np.ndarray],
                      release: Callable[[str], None] | None = None
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """The deploy-form tensors of a train-form state, in deploy-schema order: each fused conv
    computed from `get(key)` when first needed, every other tensor passed through as `get`
    returns it. `release(key)` is called for every train tensor once no longer needed (the
    streaming converter frees memory with it)."""
    desc = in_form(spec, "train")  # type: ignore[arg-type]
    fused = fused_modules(desc)
    pending: dict[str, dict[str, np.ndarray]] = {}
    for key in schema_of(in_form(desc, "deploy")):
        module, fld = key.rsplit(".", 1)
        if module not in fused:
            yield key, get(key)
            if release is not None:
                release(key)
            continue
        if module not in pending:
            prefix, rep = fused[module]
            mine = [k for n in _rep_nodes(rep) for k in node_schema(n, prefix)]
            kernel, bias = rep_kernel_bias(rep, {k: get(k) for k in mine}, prefix)
            if release is not None:
                for k in mine:
                    release(k)
            pending[module] = {"weight": kernel, "bias": bias}
        yield key, pending[module].pop(fld)
        if not pending[module]:
            del pending[module]


def _rep_nodes(rep: Rep) -> list:
    out = [n for br in rep.branches for n in br]
    return out + ([rep.bn] if rep.bn is not None else [])


def reparameterize_state(spec: object, state: Params) -> dict[str, np.ndarray]:
    """A train-form neutral state -> the deploy-form state of the same function (float64
    algebra, returned in the input dtype). Tensors that are not fused are passed through
    (the same array objects)."""
    return dict(iter_deploy_state(spec, lambda k: state[k]))


def block_kernel_bias(spec: object, params: Params) -> KernelBias:
    """The fused (kernel, bias) of a block that holds exactly one Rep (block-relative keys)."""
    desc = in_form(spec, "train")  # type: ignore[arg-type]
    found = reps(desc)
    if len(found) != 1:
        raise FusionError(f"block {getattr(desc, 'kind', desc)!r} holds {len(found)} Rep nodes; "
                          "block_kernel_bias needs exactly one")
    prefix, rep = found[0]
    return rep_kernel_bias(rep, params, prefix)


__all__ = ["check_rep", "branch_kernel_bias", "rep_kernel_bias", "fused_modules",
           "iter_deploy_state", "reparameterize_state", "block_kernel_bias", "CHUNK_ELEMENTS"]
