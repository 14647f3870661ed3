"""The fusion algebra of structural re-parameterization, as small pure numpy functions.

Conventions: kernels are PyTorch OIHW with I = in_channels / groups; biases are 1-D of length O.
Every function computes in float64 and returns the dtype of its main input, so fusing float32
weights loses nothing but the final rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import FusionError

KernelBias = tuple[np.ndarray, np.ndarray]


def _f64(a: np.ndarray | float) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _out_dtype(a: np.ndarray) -> np.dtype:
    dt = np.asarray(a).dtype
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


def bn_scale(gamma: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    """t = gamma / sqrt(var + eps), in float64; refuses var + eps <= 0 (naming the channel)."""
    denom = _f64(var) + float(eps)
    bad = np.flatnonzero(~(denom > 0))
    if bad.size:
        c = int(bad[0])
        raise FusionError(
            f"BN running_var + eps must be > 0: channel {c} has running_var={float(_f64(var)[c])!r}"
            f" and eps={eps!r} ({bad.size} bad channel(s))"
        )
    return _f64(gamma) / np.sqrt(denom)


def fuse_conv_bn(
    kernel: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    bias: np.ndarray | None = None,
) -> KernelBias:
    """Fold BN(conv(x) + b) into one conv.

    With t = gamma / sqrt(var + eps):  K' = K * t[o],  b' = beta + t * (b - mean)
    (b = 0 when the conv has no bias).
    """
    out_channels = kernel.shape[0]
    for name, v in (("gamma", gamma), ("beta", beta), ("running_mean", mean), ("running_var", var)):
        if np.shape(v) != (out_channels,):
            raise FusionError(
                f"BN {name} has shape {np.shape(v)}, the conv has {out_channels} "
                f"output channels (kernel shape {tuple(kernel.shape)})"
            )
    if bias is not None and np.shape(bias) != (out_channels,):
        raise FusionError(f"conv bias has shape {np.shape(bias)}, expected ({out_channels},)")
    t = bn_scale(gamma, var, eps)
    b = _f64(bias) if bias is not None else 0.0
    k = _f64(kernel) * t.reshape(-1, 1, 1, 1)
    fused_bias = _f64(beta) + t * (b - _f64(mean))
    dt = _out_dtype(kernel)
    return k.astype(dt, copy=False), fused_bias.astype(dt, copy=False)


def identity_kernel(
    channels: int, groups: int = 1, kernel_size: int = 1, dtype: np.dtype | type = np.float64, rows: slice | None = None
) -> np.ndarray:
    """The kernel of the identity map for a conv with `groups` groups: shape (C, C/g, k, k), with
    K[i, i mod (C/g), k//2, k//2] = 1 and 0 elsewhere (correct for any groups, depthwise too).
    `rows` selects output channels (K[rows]) without building the rest."""
    if channels <= 0 or groups <= 0 or channels % groups:
        raise FusionError(f"identity kernel needs channels divisible by groups: channels={channels}, groups={groups}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise FusionError(f"identity kernel needs an odd kernel size, got {kernel_size}")
    per_group = channels // groups
    idx = np.arange(channels)[rows if rows is not None else slice(None)]
    k = np.zeros((len(idx), per_group, kernel_size, kernel_size), dtype=dtype)
    k[np.arange(len(idx)), idx % per_group, kernel_size // 2, kernel_size // 2] = 1
    return k


def identity_offset(channels: int, groups: int, kernel: tuple[int, int], rows: slice | None = None) -> np.ndarray:
    """What a `plus_identity` conv adds to its stored weight: the identity kernel of its groups
    on the centre tap of a kh x kw kernel (odd sides), shape (C, C/g, kh, kw):
    K[i, i mod (C/g), kh // 2, kw // 2] = 1, 0 elsewhere; `rows` selects output channels."""
    kh, kw = kernel
    if kh % 2 == 0 or kw % 2 == 0:
        raise FusionError(f"an identity offset needs odd kernel sides, got {kh}x{kw}")
    k = identity_kernel(channels, groups, 1, rows=rows)
    return np.pad(k, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a k x k kernel to size x size, centred: (size - k) / 2 on every side."""
    kh, kw = kernel.shape[-2:]
    if kh != kw:
        raise FusionError(f"only square kernels can be padded, got {kh}x{kw}")
    if size < kh or (size - kh) % 2:
        raise FusionError(
            f"cannot centre a {kh}x{kh} kernel in {size}x{size}: the size difference must be even and non-negative"
        )
    p = (size - kh) // 2
    return np.pad(kernel, ((0, 0), (0, 0), (p, p), (p, p)))


def branch_padding(kernel_size: int, padding: int, dilation: int, branch_kernel_size: int) -> int:
    """The padding a k x k branch needs so that it lines up with the K x K conv it is fused into.

    A k x k kernel centred in K x K (both with dilation d) computes the same as the k x k conv with
    padding  P - d (K - k) / 2.  Raises when that is not a non-negative whole number.
    """
    diff = kernel_size - branch_kernel_size
    if diff < 0 or diff % 2:
        raise FusionError(
            f"a {branch_kernel_size}x{branch_kernel_size} branch cannot be centred "
            f"in a {kernel_size}x{kernel_size} kernel"
        )
    p = padding - dilation * diff // 2
    if p < 0:
        raise FusionError(
            f"the {branch_kernel_size}x{branch_kernel_size} branch does not line up with the "
            f"{kernel_size}x{kernel_size} conv: padding {padding} with dilation {dilation} would "
            f"need branch padding {p} < 0"
        )
    return p


def sum_branches(branches: Iterable[KernelBias]) -> KernelBias:
    """Sum of parallel convs with the same stride/dilation/groups: pad every kernel to the
    largest (centred) and add kernels and biases:  K = sum_i pad(K_i),  b = sum_i b_i."""
    items = list(branches)
    if not items:
        raise FusionError("sum_branches needs at least one branch")
    size = max(k.shape[-1] for k, _ in items)
    shape0 = (items[0][0].shape[0], items[0][0].shape[1])
    total_k = np.zeros(shape0 + (size, size))
    total_b = np.zeros(shape0[0])
    for i, (k, b) in enumerate(items):
        if k.shape[:2] != shape0:
            raise FusionError(
                f"branch {i} kernel {tuple(k.shape)} does not match branch 0 "
                f"{tuple(items[0][0].shape)} in (out, in/groups)"
            )
        if k.shape[-2] != k.shape[-1] or (size - k.shape[-1]) % 2:
            pad_kernel(k, size)  # raises the FusionError that says why
        p = (size - k.shape[-1]) // 2  # centred, as pad_kernel(k, size), without its copy
        if i == 0 and p == 0:
            total_k[...] = k  # the first full-size branch is copied in, not added to zeros
        else:
            total_k[:, :, p : size - p, p : size - p] += k
        total_b += b
    dt = _out_dtype(items[0][0])
    return total_k.astype(dt, copy=False), total_b.astype(dt, copy=False)


def fuse_1x1_kxk(k1: np.ndarray, b1: np.ndarray, k2: np.ndarray, b2: np.ndarray, groups: int = 1) -> KernelBias:
    """A 1x1 conv (k1: D x C/g, bias b1) followed by a kxk conv (k2: E x D/g x k x k, bias b2),
    both with `groups` groups, as one kxk conv (Diverse-Branch transform III), per group g:

        K[e, c] = sum_d k2[e, d] k1[d, c],    b[e] = b2[e] + sum_{d,h,w} k2[e, d, h, w] b1[d].

    Exact when the kxk conv pads its input with b1 (the DBB "BN and pad" layer) or has no padding.
    """
    if k1.shape[-2:] != (1, 1):
        raise FusionError(f"transIII needs a 1x1 first conv, got kernel {tuple(k1.shape)}")
    d, cg = k1.shape[:2]
    e, dg = k2.shape[:2]
    if d % groups or e % groups or dg * groups != d:
        raise FusionError(
            f"transIII: kernels {tuple(k1.shape)} and {tuple(k2.shape)} do not chain with groups={groups}"
        )
    a = _f64(k1)[:, :, 0, 0].reshape(groups, d // groups, cg)
    k2g = _f64(k2).reshape(groups, e // groups, dg, *k2.shape[2:])
    k = np.einsum("godhw,gdc->gochw", k2g, a).reshape(e, cg, *k2.shape[2:])
    b1g = _f64(b1).reshape(groups, dg)
    b = _f64(b2) + np.einsum("godhw,gd->go", k2g, b1g).reshape(e)
    dt = _out_dtype(k2)
    return k.astype(dt), b.astype(dt)


def avg_pool_kernel(
    channels: int, kernel_size: int, groups: int = 1, dtype: np.dtype | type = np.float64
) -> np.ndarray:
    """k x k average pooling (count_include_pad) as a conv kernel: identity_kernel spread to
    1/k^2 over every tap, shape (C, C/g, k, k)."""
    kid = identity_kernel(channels, groups, 1, dtype=np.float64)
    return (np.tile(kid, (1, 1, kernel_size, kernel_size)) / kernel_size**2).astype(dtype)


def concat_branches(branches: Sequence[KernelBias]) -> KernelBias:
    """Branches that write disjoint output channels (depth concatenation) as one conv:
    kernels and biases concatenated along the output axis (kernels padded to the largest)."""
    if not branches:
        raise FusionError("concat_branches needs at least one branch")
    size = max(k.shape[-1] for k, _ in branches)
    ks = [pad_kernel(_f64(k), size) for k, _ in branches]
    if len({k.shape[1] for k in ks}) != 1:
        raise FusionError(
            "concat_branches: branches differ in input channels per group: "
            + ", ".join(str(tuple(k.shape)) for k, _ in branches)
        )
    dt = _out_dtype(branches[0][0])
    return (np.concatenate(ks, axis=0).astype(dt), np.concatenate([_f64(b) for _, b in branches]).astype(dt))
