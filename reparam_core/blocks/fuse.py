"""The fusion rule of the block description: the equivalent (kernel, bias) of any `Rep` node.

A branch is a chain of primitives read left to right; each primitive maps the affine conv
(K, b) computed so far (the identity when nothing came before) to a new one:

    Conv W, c      first: (W, c);  after a 1x1 stage (K1, b1): fuse_1x1_kxk  (transform III);
                   a `plus_identity` conv's W is its stored weight + identity_offset
    Linear W, c    the 1x1 conv W[:, :, None, None] (groups 1), the same way
    AvgPool k      the conv avg_pool_kernel(C, k, groups), composed the same way
    BN / PadBN     K' = K t[o],  b' = beta + t (b - mean),  t = gamma / sqrt(var + eps)
    Scale s        K' = K s[o],  b' = b s
    Bias s         K' = K,       b' = b + s  (before a conv: transform III adds W s, exact as the
                   conv then has no padding)
    (nothing)      the identity kernel of the fused conv's groups, bias 0

A branch whose (last) conv has r times the fused conv's dilation is dilated by r (dilate_kernel:
r - 1 zeros between its taps) so that it lies on the fused conv's grid (UniRepLKNet's dilated
re-param: 5x5, 3x3 d2 and 3x3 d3 branches of a 7x7 conv). The branches are then centred in the
fused kernel and summed with the Rep's coefficients (or concatenated over output channels), a
BN after the sum and then the Rep's scale fold in, and a residual adds the identity kernel of
the fused conv's groups last. A Linear as the fused module is the 1x1 conv of its weight
(O, I). `check_rep` refuses every description where
this is not exactly the function of the branches (alignment, strides, groups, padding that a
bias would leak into). Everything is computed in float64 and rounded once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FusionError
from .fusion import KernelBias, bn_scale, dilate_kernel, fuse_1x1_kxk, identity_kernel, identity_offset
from .nodes import (
    BN,
    AvgPool,
    Bias,
    Branch,
    Conv,
    Description,
    Linear,
    PadBN,
    Pair,
    Primitive,
    Rep,
    Scale,
    SpecLike,
    in_form,
    join_key,
    pair,
    reps,
)
from .schema import node_schema, schema_of

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


def as_conv(node: Conv | Linear) -> Conv:
    """A conv as it is; a Linear as the 1x1 conv (groups 1, in_features -> out_features) it is
    on N x C x H x W (and on N x C, read as N x C x 1 x 1)."""
    if isinstance(node, Conv):
        return node
    return Conv(node.name, node.in_features, node.out_features, 1, bias=node.bias)


def fused_conv(rep: Rep) -> Conv:
    """The fused module of `rep` as a conv (as_conv)."""
    return as_conv(rep.fused)


def _branch_geometry(branch: Branch, rep: Rep, index: int) -> tuple[_Geometry | None, int]:
    """The geometry of a branch (None for a parameter-free identity) and its output channels;
    raises FusionError when the chain is not exactly one conv."""
    f = fused_conv(rep)
    where = f"branch {index} of the Rep fused into {f.name!r}"
    channels = f.in_channels
    geo: _Geometry | None = None
    bias_so_far = False  # the value a zero-padded input produces at this point is not 0
    biased_by = ""  # what made it so
    pending_pad = 0
    for node in branch:
        if isinstance(node, Linear):
            node = as_conv(node)
        if isinstance(node, (Conv, AvgPool)):
            kernel, stride, padding = (
                (node.kernel, node.stride, node.padding)
                if isinstance(node, Conv)
                else (pair(node.kernel), pair(node.stride), pair(node.padding))
            )
            dilation = node.dilation if isinstance(node, Conv) else (1, 1)
            if isinstance(node, Conv):
                if node.in_channels != channels:
                    raise FusionError(
                        f"{where}: conv {node.name!r} reads {node.in_channels} "
                        f"channels, the branch has {channels} there"
                    )
                if node.groups != f.groups:
                    raise FusionError(
                        f"{where}: conv {node.name!r} has groups={node.groups}, the fused conv groups={f.groups}"
                    )
                channels = node.out_channels
            if geo is not None and (geo.kernel != (1, 1) or geo.stride != (1, 1) or geo.padding != (0, 0)):
                raise FusionError(
                    f"{where}: only a 1x1, stride-1, unpadded stage can come before another conv or pool in a branch"
                )
            if padding != (0, 0) and bias_so_far:
                raise FusionError(
                    f"{where}: the padding of {_stage_name(node)} would pad a "
                    f"biased value with zeros (the output of {biased_by}), which the fused conv cannot compute; "
                    "put a PadBN before it, or give it no padding"
                )
            if pending_pad and padding != (0, 0):
                raise FusionError(f"{where}: a PadBN pads already; the stage after it must have padding 0")
            geo = _Geometry(kernel, stride, (padding[0] + pending_pad, padding[1] + pending_pad), dilation)
            pending_pad = 0
            if isinstance(node, Conv) and node.bias and not bias_so_far:
                bias_so_far, biased_by = True, f"the bias of conv {node.name!r}"
        elif isinstance(node, (BN, PadBN, Scale, Bias)):
            if node.channels != channels:
                raise FusionError(
                    f"{where}: {type(node).__name__} {node.name!r} has "
                    f"{node.channels} channels, the branch has {channels} there"
                )
            if isinstance(node, (Scale, Bias)):
                _check_stored_shape(node, where)
            if isinstance(node, PadBN):
                if bias_so_far:
                    raise FusionError(
                        f"{where}: PadBN {node.name!r} must follow a bias-free stage (it pads with BN(0))"
                    )
                pending_pad += node.pad
            if isinstance(node, (BN, PadBN, Bias)) and not bias_so_far:
                bias_so_far, biased_by = True, f"{type(node).__name__} {_key(node)!r}"
        else:
            raise FusionError(f"{where}: {type(node).__name__} is not a branch primitive")
    if pending_pad:
        raise FusionError(f"{where}: a PadBN must be followed by a conv or pool")
    return geo, channels


def _check_stored_shape(node: Scale | Bias, where: str) -> None:
    """A Scale or Bias stores its C values with any shape of C elements."""
    if math.prod(node.stored_shape) != node.channels:
        raise FusionError(
            f"{where}: {type(node).__name__} {node.key!r} is stored with shape {node.stored_shape}, "
            f"which does not hold its {node.channels} channels"
        )


def _key(node: BN | PadBN | Bias) -> str:
    """A BN's module name, a Bias's parameter key."""
    return node.key if isinstance(node, Bias) else node.name


def _stage_name(node: Conv | AvgPool) -> str:
    return f"conv {node.name!r}" if isinstance(node, Conv) else "the average pool"


def _grid_ratio(kernel: Pair, dilation: Pair, fused: Conv) -> Pair:
    """r = branch dilation / fused dilation on each axis (1 on an axis where the kernel is 1 wide:
    its dilation reads nothing); the caller checks that it divides (_check_alignment)."""
    r = [dilation[a] // fused.dilation[a] if kernel[a] > 1 else 1 for a in (0, 1)]
    return r[0], r[1]


def _stage_grid_ratio(node: Conv | Linear | AvgPool | None, fused: Conv) -> Pair:
    """The _grid_ratio of a branch's conv stage (an average pool or nothing has dilation 1)."""
    if isinstance(node, Conv):
        return _grid_ratio(node.kernel, node.dilation, fused)
    return (1, 1)


def _span(kernel: Pair, ratio: Pair) -> Pair:
    """The size (k - 1) r + 1 of a k-tap kernel dilated by r: its size on the fused conv's grid."""
    return (kernel[0] - 1) * ratio[0] + 1, (kernel[1] - 1) * ratio[1] + 1


def _check_alignment(geo: _Geometry | None, rep: Rep, index: int) -> None:
    """A branch conv (kernel k, dilation d_b, padding p) lines up with the fused conv (K, D, P)
    when d_b = r D for a whole r (its taps fall on the fused grid), its span e = (k - 1) r + 1
    centres in K (K - e even, >= 0) and p = P - D (K - e) / 2 (the centred window's padding)."""
    f = fused_conv(rep)
    where = f"branch {index} of the Rep fused into {f.name!r}" if index >= 0 else f"the residual of {f.name!r}"
    if geo is None:  # identity: the centre tap must read x at the output pixel
        if f.in_channels != f.out_channels or f.stride != (1, 1):
            raise FusionError(
                f"{where}: {'an identity branch' if index >= 0 else 'an identity'} needs in == out channels and stride "
                f"1, got {f.in_channels} -> {f.out_channels}, stride {f.stride}"
            )
        geo = _Geometry((1, 1), (1, 1), (0, 0), f.dilation)
    if geo.stride != f.stride:
        raise FusionError(f"{where}: stride {geo.stride} differs from the fused conv's {f.stride}")
    for axis in (0, 1):
        if geo.kernel[axis] > 1 and geo.dilation[axis] % f.dilation[axis]:
            raise FusionError(
                f"{where}: dilation {geo.dilation} differs from the fused conv's {f.dilation} and is not a "
                f"multiple of it: the {geo.kernel[0]}x{geo.kernel[1]} kernel's taps do not fall on the fused kernel's"
            )
    span = _span(geo.kernel, _grid_ratio(geo.kernel, geo.dilation, f))
    for axis in (0, 1):
        k, big, d = span[axis], f.kernel[axis], f.dilation[axis]
        if k > big or (big - k) % 2:
            dilated = f" (dilation {geo.dilation}: it spans {span[0]}x{span[1]})" if span != geo.kernel else ""
            raise FusionError(
                f"{where}: a {geo.kernel[0]}x{geo.kernel[1]} kernel{dilated} cannot be centred in "
                f"the {f.kernel[0]}x{f.kernel[1]} kernel of the fused conv (dilation {f.dilation})"
            )
        want = f.padding[axis] - d * (big - k) // 2
        if geo.padding[axis] != want:
            raise FusionError(
                f"{where}: padding {geo.padding} does not line up with the fused "
                f"{f.kernel[0]}x{f.kernel[1]} conv (padding {f.padding}, dilation "
                f"{f.dilation}): it must be {want} on axis {axis}"
            )


def _check_combination(rep: Rep) -> None:
    """The coefficients (one per branch), the scale (the fused outputs) and the residual (an
    identity: in == out channels, stride 1, centred) of a sum; a concatenation has none."""
    f = fused_conv(rep)
    if rep.combine == "concat":
        extras = [
            what
            for what, present in (
                (f"coefficients {rep.coefficients}", rep.coefficients is not None),
                (f"scale {rep.scale.key if rep.scale else ''!r}", rep.scale is not None),
                ("residual=True", rep.residual),
            )
            if present
        ]
        if extras:
            raise FusionError(f"the concatenating Rep fused into {f.name!r} cannot have {', '.join(extras)}")
        return
    if rep.coefficients is not None:
        if len(rep.coefficients) != len(rep.branches):
            raise FusionError(
                f"the Rep fused into {f.name!r} has {len(rep.branches)} branches but "
                f"{len(rep.coefficients)} coefficients {rep.coefficients}"
            )
        bad = [c for c in rep.coefficients if not (isinstance(c, (int, float)) and math.isfinite(c))]
        if bad:
            raise FusionError(
                f"the Rep fused into {f.name!r} has a coefficient that is not a finite number: {bad[0]!r}"
            )
    if rep.scale is not None:
        if rep.scale.channels != f.out_channels:
            raise FusionError(
                f"the scale {rep.scale.key!r} of the Rep fused into {f.name!r} has {rep.scale.channels} "
                f"channels; the fused module has {f.out_channels}"
            )
        _check_stored_shape(rep.scale, f"the Rep fused into {f.name!r}")
    if rep.residual:
        _check_alignment(None, rep, -1)


def check_rep(rep: Rep) -> None:
    """Raise FusionError unless the fused conv (or Linear) computes exactly
    [x] + scale(bn(sum_i c_i branch_i(x))) (or the concatenation of the branches, then the BN)."""
    if isinstance(rep.fused, Conv) and rep.fused.plus_identity:
        raise FusionError(
            f"the fused conv {rep.fused.name!r} of a Rep stores its whole kernel: plus_identity must be False"
        )
    f = fused_conv(rep)
    if not rep.branches:
        raise FusionError(f"the Rep fused into {f.name!r} has no branch")
    outs = []
    for i, branch in enumerate(rep.branches):
        geo, channels = _branch_geometry(branch, rep, i)
        _check_alignment(geo, rep, i)
        outs.append(channels)
    total = sum(outs) if rep.combine == "concat" else None
    if rep.combine == "sum" and any(c != f.out_channels for c in outs):
        raise FusionError(f"the branches of {f.name!r} give {outs} channels; the fused conv has {f.out_channels}")
    if rep.combine == "concat" and (total != f.out_channels or f.groups != 1):
        raise FusionError(
            f"the concatenated branches of {f.name!r} give {total} channels "
            f"(groups {f.groups}); the fused conv has {f.out_channels}, groups 1"
        )
    if rep.bn is not None and rep.bn.channels != f.out_channels:
        raise FusionError(
            f"the BN {rep.bn.name!r} after the sum has {rep.bn.channels} channels; the fused conv has {f.out_channels}"
        )
    _check_combination(rep)


# --------------------------------------------------------------------------- the rule


def _bn_rows(params: Params, prefix: str, name: str, rows: slice) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(params[join_key(prefix, f"{name}.{f}")][rows], np.float64) for f in BN_FIELDS)


def _fold_bn(k: np.ndarray, b: np.ndarray, bn: tuple[np.ndarray, ...], eps: float) -> KernelBias:
    gamma, beta, mean, var = bn
    t = bn_scale(gamma, var, eps)
    return k * t.reshape(-1, 1, 1, 1), beta + t * (b - mean)


def _avg_kernel(channels: int, k: int, groups: int, rows: slice) -> np.ndarray:
    ident = identity_kernel(channels, groups, 1, rows=rows)
    return np.tile(ident, (1, 1, k, k)) / float(k * k)


def _row_separable(branch: Branch) -> bool:
    """Whether each output channel of the branch depends on its own rows only (at most one
    conv, linear or pool, and it comes first; a plus_identity conv is computed whole)."""
    stages = [i for i, n in enumerate(branch) if isinstance(n, (Conv, Linear, AvgPool))]
    return stages in ([], [0]) and not any(isinstance(n, Conv) and n.plus_identity for n in branch)


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


def _vector(params: Params, node: Scale | Bias, prefix: str, rows: slice) -> np.ndarray:
    """The C values of a Scale or Bias (stored with its stored_shape), rows `rows`, float64."""
    key = join_key(prefix, node.key)
    if key not in params:
        raise FusionError(f"missing tensor {key} for the fusion")
    a = _check_shape(np.asarray(params[key]), key, node.stored_shape)
    return np.asarray(a.reshape(node.channels)[rows], np.float64)


def _weight(params: Params, prefix: str, node: Conv | Linear, rows: slice) -> np.ndarray:
    """The OIHW kernel of a conv, or the (O, I, 1, 1) view of a Linear's (O, I) weight, rows
    `rows`, float64; a plus_identity conv's with its identity offset added."""
    key = join_key(prefix, f"{node.name}.weight")
    if isinstance(node, Linear):
        return _param(params, key, (node.out_features, node.in_features), rows)[:, :, None, None]
    w = _param(params, key, (node.out_channels, node.in_channels // node.groups, *node.kernel), rows)
    if node.plus_identity:
        w = w + identity_offset(node.out_channels, node.groups, node.kernel, rows=rows)
    return w


def _compose(kb: KernelBias | None, w: np.ndarray, c: np.ndarray, groups: int, rows: slice) -> KernelBias:
    """A conv stage (w, c) after what came before: itself first, transform III after a 1x1."""
    if kb is None:
        return w, c
    k, b = fuse_1x1_kxk(kb[0], kb[1], w, c, groups)
    return np.asarray(k[rows], np.float64), np.asarray(b[rows], np.float64)


def branch_kernel_bias(
    branch: Branch, rep: Rep, params: Params, prefix: str = "", rows: slice = slice(None)
) -> KernelBias:
    """The (kernel, bias) of one branch in float64, output channels `rows` only (rows must be
    all for a branch that is not row-separable). Kernel (rows, C/g, kh, kw) unpadded, on the
    fused conv's grid: dilated by its conv's dilation / the fused conv's (dilate_kernel). A
    Linear is a 1x1 conv; a Bias b adds to the bias (b' = b + s, transform III carries it through
    the conv after it: exact as check_rep lets that conv have no padding)."""
    f = fused_conv(rep)
    kb: KernelBias | None = None
    channels = f.in_channels
    ratio = (1, 1)
    for node in branch:
        if isinstance(node, (Conv, Linear, AvgPool)):
            ratio = _stage_grid_ratio(node, f)
        if isinstance(node, (Conv, Linear)):
            conv = as_conv(node)
            r = rows if kb is None else slice(None)
            w = _weight(params, prefix, node, r)
            c = (
                _param(params, join_key(prefix, f"{node.name}.bias"), (conv.out_channels,), r)
                if conv.bias
                else np.zeros(w.shape[0])
            )
            kb = _compose(kb, w, c, f.groups, rows)
            channels = conv.out_channels
        elif isinstance(node, AvgPool):
            w = _avg_kernel(channels, node.kernel, f.groups, rows if kb is None else slice(None))
            kb = _compose(kb, w, np.zeros(w.shape[0]), f.groups, rows)
        else:
            k, b = kb if kb is not None else _identity(channels, f.groups, rows)
            if isinstance(node, (BN, PadBN)):
                kb = _fold_bn(k, b, _bn_rows(params, prefix, node.name, rows), node.eps)
            elif isinstance(node, Scale):
                s = _vector(params, node, prefix, rows)
                kb = k * s.reshape(-1, 1, 1, 1), b * s
            else:
                kb = k, b + _vector(params, node, prefix, rows)
    if kb is None:
        return _identity(channels, f.groups, rows)
    return (dilate_kernel(kb[0], ratio), kb[1]) if ratio != (1, 1) else kb


def _identity(channels: int, groups: int, rows: slice) -> KernelBias:
    k = identity_kernel(channels, groups, 1, rows=rows)
    return k, np.zeros(k.shape[0])


def _add_centred(total: np.ndarray, k: np.ndarray) -> None:
    """total[:, :, centred window] += k (kernel sizes differ by even amounts, checked before)."""
    ph = (total.shape[2] - k.shape[2]) // 2
    pw = (total.shape[3] - k.shape[3]) // 2
    total[:, :, ph : ph + k.shape[2], pw : pw + k.shape[3]] += k


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
        _POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="reparam-fuse")
    for _ in _POOL.map(fn, slices):  # re-raises the first error of any slice
        pass


def _result_dtype(rep: Rep, params: Params, prefix: str) -> np.dtype:
    """The dtype of the Rep's first conv or linear weight (of its first tensor when it has none;
    float32 when it has no tensor at all)."""
    schema: dict[str, Any] = {}
    for node in _rep_nodes(rep):
        schema.update(node_schema(node, prefix))
    present = [k for k in schema if k in params]
    convs = [k for k in present if schema[k].kind in ("conv.weight", "linear.weight")]
    if not present:
        return np.dtype(np.float32)
    dt = np.asarray(params[(convs or present)[0]]).dtype
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


def _affine(nodes: tuple[Primitive, ...], params: Params, prefix: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel affine map y = s x + c of a chain of BN / PadBN / Scale / Bias
    (Scale w: s' = w s, c' = w c; Bias b: c' = c + b)."""
    s, c = np.ones(n), np.zeros(n)
    every = slice(None)
    for node in nodes:
        if isinstance(node, Scale):
            w = _vector(params, node, prefix, every)
            s, c = s * w, c * w
        elif isinstance(node, Bias):
            c = c + _vector(params, node, prefix, every)
        elif isinstance(node, (BN, PadBN)):
            gamma, beta, mean, var = _bn_rows(params, prefix, node.name, every)
            t = bn_scale(gamma, var, node.eps)
            s, c = s * t, beta + t * (c - mean)
        else:
            raise FusionError(f"{type(node).__name__} after the head of a branch is not a per-channel affine map")
    return s, c


@dataclass(frozen=True)
class _Separable:
    """A branch that is one conv (or linear, or pool, or nothing: the identity) followed by
    per-channel affine nodes: K = W s[o] and b = s[o] c + shift[o]."""

    head: Conv | Linear | AvgPool | None
    scale: np.ndarray
    bias: np.ndarray


def _scaled(sep: _Separable, c: float) -> _Separable:
    """The branch times the coefficient c."""
    return sep if c == 1 else _Separable(sep.head, sep.scale * c, sep.bias * c)


def _separable(branch: Branch, rep: Rep, params: Params, prefix: str) -> _Separable:
    out_ch = fused_conv(rep).out_channels
    head = branch[0] if branch and isinstance(branch[0], (Conv, Linear, AvgPool)) else None
    s, shift = _affine(branch[1:] if head is not None else branch, params, prefix, out_ch)
    if isinstance(head, (Conv, Linear)) and head.bias:
        shift = shift + s * _param(params, join_key(prefix, f"{head.name}.bias"), (out_ch,), slice(None))
    return _Separable(head, s, shift)


def _rows_view(params: Params, key: str, shape: tuple[int, ...], part: tuple[slice, slice]) -> np.ndarray:
    """params[key][part] without a copy, after checking the shape."""
    if key not in params:
        raise FusionError(f"missing tensor {key} for the fusion")
    return _check_shape(np.asarray(params[key]), key, shape)[part]


def _add_separable(
    k_tot: np.ndarray, sep: _Separable, rep: Rep, params: Params, prefix: str, part: tuple[slice, slice]
) -> None:
    """k_tot += K[part] of a separable branch, centred in k_tot (a centred window of the fused
    kernel at least as large as the branch's). `part` selects (output rows, input columns)."""
    f = fused_conv(rep)
    rows, cols = part
    s = sep.scale[rows]
    if sep.head is None:  # the identity taps K[o, o mod (C/g), centre] carry s[o]
        taps = np.arange(f.out_channels)[rows] % (f.in_channels // f.groups)
        first, stop, _ = cols.indices(f.in_channels // f.groups)
        hit = (taps >= first) & (taps < stop)
        k_tot[np.flatnonzero(hit), taps[hit] - first, k_tot.shape[2] // 2, k_tot.shape[3] // 2] += s[hit]
        return
    if isinstance(sep.head, (Conv, Linear)):
        w = _head_weight(sep, params, prefix, part)
        ratio = _stage_grid_ratio(sep.head, f)
        if ratio != (1, 1):
            w = dilate_kernel(w, ratio)
    else:
        w = _avg_kernel(f.in_channels, sep.head.kernel, f.groups, rows)[:, cols]
    ph, pw = (k_tot.shape[2] - w.shape[2]) // 2, (k_tot.shape[3] - w.shape[3]) // 2
    k_tot[:, :, ph : ph + w.shape[2], pw : pw + w.shape[3]] += w * s.reshape(-1, 1, 1, 1)


def _writes_whole(branch: Branch, rep: Rep) -> bool:
    """Whether a separable branch starts with a conv of the fused conv's full kernel size (on the
    fused grid: not dilated further)."""
    head = branch[0] if branch else None
    f = fused_conv(rep)
    return (
        isinstance(head, (Conv, Linear)) and as_conv(head).kernel == f.kernel and _stage_grid_ratio(head, f) == (1, 1)
    )


Empty = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def _head_weight(sep: _Separable, params: Params, prefix: str, part: tuple[slice, slice]) -> np.ndarray:
    h = sep.head
    if isinstance(h, Linear):
        return _rows_view(params, join_key(prefix, f"{h.name}.weight"), (h.out_features, h.in_features), part)[
            :, :, None, None
        ]
    if not isinstance(h, Conv):
        raise FusionError("internal: only a conv branch is written whole")
    return _rows_view(
        params, join_key(prefix, f"{h.name}.weight"), (h.out_channels, h.in_channels // h.groups, *h.kernel), part
    )


def _box(rest: list[_Separable], whole: list[KernelBias], fused: Conv) -> Pair:
    """The centred window of the fused kernel that the branches in `rest` and `whole` reach
    ((0, 0) when there are none)."""
    kernel = fused.kernel
    sizes = [
        (1, 1)
        if sep.head is None or isinstance(sep.head, Linear)
        else _span(sep.head.kernel, _stage_grid_ratio(sep.head, fused))
        if isinstance(sep.head, Conv)
        else (sep.head.kernel,) * 2
        for sep in rest
    ] + [tuple(k.shape[2:]) for k, _ in whole]
    if not sizes:
        return (0, 0)
    return (min(kernel[0], max(h for h, _ in sizes)), min(kernel[1], max(w for _, w in sizes)))


def _concat_kernel_bias(rep: Rep, params: Params, prefix: str, kernel: np.ndarray, bias: np.ndarray) -> KernelBias:
    """Branches writing disjoint output channels: each centred in its own rows; the BN after
    the concatenation folded into its rows (K t[o], beta + t (b - mean))."""
    start = 0
    for branch in rep.branches:
        k, b = branch_kernel_bias(branch, rep, params, prefix)
        rows = slice(start, start + k.shape[0])
        window = np.zeros((k.shape[0], *kernel.shape[1:]))
        _add_centred(window, k)
        if rep.bn is not None:
            window, b = _fold_bn(window, b, _bn_rows(params, prefix, rep.bn.name, rows), rep.bn.eps)
        kernel[rows], bias[rows] = window, b
        start += k.shape[0]
    return kernel, bias


def rep_kernel_bias(rep: Rep, params: Params, prefix: str = "", empty: Empty = np.empty) -> KernelBias:
    """The (kernel OIHW, bias) of the fused conv of `rep` ((weight (O, I), bias) when it is a
    Linear), from the tensors in `params` (keys `prefix.<name>.<field>`), in float64, rounded
    once to the dtype of its first conv or linear weight. With a sum,

        K = [Id] + a[o] sum_i c_i K_i,   b = a (t (sum_i c_i b_i - mean) + beta)

    where t, beta, mean are the BN's after the sum (t = 1, beta = mean = 0 without one), a
    the scale after it (1 without one), c_i the coefficients, and Id the identity kernel of
    the fused conv's groups (centred) when the Rep has a residual.

    The kernel is computed one slice at a time (on a few threads) along whichever of its output
    and input axes is outermost in memory: every tap of the fused kernel depends on the same
    tap of the branch kernels only. `empty(shape, dtype)` allocates the kernel: it may return a
    non-contiguous OIHW view of a buffer in another memory order (a backend's native layout,
    e.g. HWIO); the float64 temporaries follow that order, so a backend whose inputs are views
    in the same order pays for no transpose."""
    f = fused_conv(rep)
    out_ch = f.out_channels
    shape = (out_ch, f.in_channels // f.groups, *f.kernel)
    dt = _result_dtype(rep, params, prefix)
    if isinstance(rep.fused, Linear):  # computed in an (O, I, 1, 1) view of the (O, I) weight
        weight = np.empty(shape[:2], dt)
        kernel = weight[:, :, None, None]
    else:
        weight = kernel = empty(shape, dt)
    bias = np.empty(out_ch, dt)
    if rep.combine == "concat":
        _concat_kernel_bias(rep, params, prefix, kernel, bias)
        return weight, bias
    post = np.ones(out_ch)
    if rep.bn is not None:  # the BN after the sum scales every branch: folded into each
        gamma, beta, mean, var = _bn_rows(params, prefix, rep.bn.name, slice(None))
        post = bn_scale(gamma, var, rep.bn.eps)
    after = _vector(params, rep.scale, prefix, slice(None)) if rep.scale is not None else np.ones(out_ch)
    whole = [
        (k * (rep.coefficient(i) * after * post).reshape(-1, 1, 1, 1), rep.coefficient(i) * b)
        for i, br in enumerate(rep.branches)
        if not _row_separable(br)
        for k, b in (branch_kernel_bias(br, rep, params, prefix),)
    ]
    ordered = sorted(
        (i for i, br in enumerate(rep.branches) if _row_separable(br)),
        key=lambda i: not _writes_whole(rep.branches[i], rep),
    )  # a full-size one first
    separable = [_scaled(_separable(rep.branches[i], rep, params, prefix), rep.coefficient(i)) for i in ordered]
    b64 = sum((sep.bias for sep in separable), np.zeros(out_ch)) + sum((b for _, b in whole), np.zeros(out_ch))
    if rep.bn is not None:
        b64 = beta + post * (b64 - mean)
    bias[...] = after * b64
    separable = [_Separable(sep.head, sep.scale * after * post, sep.bias) for sep in separable]
    if rep.residual:  # the identity, after the scale
        separable.append(_Separable(None, np.ones(out_ch), np.zeros(out_ch)))
    first = separable[0] if ordered and _writes_whole(rep.branches[ordered[0]], rep) else None
    rest = separable[1:] if first is not None else separable
    box = _box(rest, whole, f) if first is not None else f.kernel
    ph, pw = (f.kernel[0] - box[0]) // 2, (f.kernel[1] - box[1]) // 2
    window = (slice(None), slice(None), slice(ph, ph + box[0]), slice(pw, pw + box[1]))  # the centred box
    axis = 1 if kernel.strides[1] > kernel.strides[0] else 0
    step = max(1, CHUNK_ELEMENTS * shape[axis] // max(1, math.prod(shape)))

    def fuse_part(sl: slice) -> None:
        """Taps that only the full-size branch reaches are round(W s) in one pass; the centred
        box that other branches reach is summed in float64 and rounded once."""
        part = (sl, slice(None)) if axis == 0 else (slice(None), sl)
        out = kernel[part]
        if first is not None:
            w = _head_weight(first, params, prefix, part)
            s4 = first.scale[part[0]].reshape(-1, 1, 1, 1)
            np.multiply(w, s4, out=out, casting="same_kind")
            if box == (0, 0):
                return
            k_box = np.multiply(w[window], s4)
        else:
            k_box = np.zeros(out.shape)
        for sep in rest:
            _add_separable(k_box, sep, rep, params, prefix, part)
        for k, _ in whole:
            _add_centred(k_box, k[part])
        out[window] = k_box

    _map_rows(fuse_part, shape[axis], step)
    return weight, bias


# --------------------------------------------------------------------------- whole states


def fused_modules(desc: Description, prefix: str = "") -> dict[str, tuple[str, Rep]]:
    """The deploy conv module path of every Rep -> (the prefix of its block, the Rep)."""
    return {join_key(p, r.fused.name): (p, r) for p, r in reps(desc, prefix)}


def iter_deploy_state(
    spec: SpecLike,
    get: Callable[[str], np.ndarray],
    release: Callable[[str], None] | None = None,
    empty: Empty = np.empty,
) -> Iterator[tuple[str, np.ndarray]]:
    """The deploy-form tensors of a train-form state, in deploy-schema order: each fused conv
    computed from `get(key)` when first needed, every other tensor passed through as `get`
    returns it. `release(key)` is called for every train tensor once no longer needed (the
    streaming converter frees memory with it); `empty` allocates the fused kernels (see
    rep_kernel_bias)."""
    desc = in_form(spec, "train")
    fused = fused_modules(desc)
    pending: dict[str, dict[str, np.ndarray]] = {}
    for key in schema_of(in_form(desc, "deploy")):
        module, _, fld = key.rpartition(".")
        if module not in fused:
            yield key, get(key)
            if release is not None:
                release(key)
            continue
        if module not in pending:
            prefix, rep = fused[module]
            mine = [k for n in _rep_nodes(rep) for k in node_schema(n, prefix)]
            kernel, bias = rep_kernel_bias(rep, {k: get(k) for k in mine}, prefix, empty)
            if release is not None:
                for k in mine:
                    release(k)
            pending[module] = {"weight": kernel, "bias": bias}
        yield key, pending[module].pop(fld)
        if not pending[module]:
            del pending[module]


def _rep_nodes(rep: Rep) -> list[Primitive]:
    """The nodes whose tensors the fusion of `rep` reads, in forward order."""
    out = [n for br in rep.branches for n in br]
    return out + [n for n in (rep.bn, rep.scale) if n is not None]


def reparameterize_state(spec: SpecLike, state: Params) -> dict[str, np.ndarray]:
    """A train-form neutral state -> the deploy-form state of the same function (float64
    algebra, returned in the input dtype). Tensors that are not fused are passed through
    (the same array objects)."""
    return dict(iter_deploy_state(spec, lambda k: state[k]))


def block_kernel_bias(spec: SpecLike, params: Params) -> KernelBias:
    """The fused (kernel, bias) of a block that holds exactly one Rep (block-relative keys)."""
    desc = in_form(spec, "train")
    found = reps(desc)
    if len(found) != 1:
        raise FusionError(
            f"block {getattr(desc, 'kind', desc)!r} holds {len(found)} Rep nodes; block_kernel_bias needs exactly one"
        )
    prefix, rep = found[0]
    return rep_kernel_bias(rep, params, prefix)


__all__ = [
    "check_rep",
    "branch_kernel_bias",
    "rep_kernel_bias",
    "fused_modules",
    "iter_deploy_state",
    "reparameterize_state",
    "block_kernel_bias",
    "CHUNK_ELEMENTS",
]
