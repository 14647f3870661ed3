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


def bn_zero(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    """BN(0) per channel, beta - mean gamma / sqrt(var + eps), in float64: the value a BN gives a
    zero input (what a PadBN pads with, the constant a BN-and-pad written as ops subtracts and
    adds back). Refuses var + eps <= 0 like bn_scale."""
    out: np.ndarray = _f64(beta) - _f64(mean) * bn_scale(gamma, var, eps)
    return out


def _check_bn_shapes(bn: Sequence[np.ndarray], channels: int, context: str, where: str = "") -> None:
    """Raise unless BN (gamma, beta, mean, var) are all of shape (channels,)."""
    for name, v in zip(("gamma", "beta", "running_mean", "running_var"), bn):
        if np.shape(v) != (channels,):
            raise FusionError(f"{where}BN {name} has shape {np.shape(v)}, {context}")


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
    (b = 0 when the conv has no bias). `kernel` is OIHW, or any array whose first axis is the
    output (a Linear weight (O, I) included).
    """
    out_channels = kernel.shape[0]
    _check_bn_shapes(
        (gamma, beta, mean, var),
        out_channels,
        f"the conv has {out_channels} output channels (kernel shape {tuple(kernel.shape)})",
    )
    if bias is not None and np.shape(bias) != (out_channels,):
        raise FusionError(f"conv bias has shape {np.shape(bias)}, expected ({out_channels},)")
    t = bn_scale(gamma, var, eps)
    b = _f64(bias) if bias is not None else 0.0
    k = _f64(kernel) * t.reshape((-1,) + (1,) * (np.ndim(kernel) - 1))
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


def _pair(v: int | tuple[int, int], what: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(t) != 2:
        raise FusionError(f"{what} must be an int or a pair, got {v!r}")
    return int(t[0]), int(t[1])


def _as_oihw(weight: np.ndarray, what: str) -> np.ndarray:
    """A Linear weight (O, I) as the 1x1 conv kernel (O, I, 1, 1); a 4-D kernel unchanged."""
    w = np.asarray(weight)
    if w.ndim == 2:
        return w[:, :, None, None]
    if w.ndim != 4:
        raise FusionError(
            f"{what}: expected a Linear weight (O, I) or a conv kernel (O, I, kh, kw), got shape {w.shape}"
        )
    return w


def _input_channel_of(kernel: np.ndarray, groups: int, what: str) -> np.ndarray:
    """c[o, i] = g(o) * I + i: the input channel that kernel entry K[o, i] reads, where
    g(o) = o // (O / groups) is the group of output o and I = kernel.shape[1]."""
    o, i = kernel.shape[:2]
    if groups < 1 or o % groups:
        raise FusionError(
            f"{what}: {o} output channels (kernel shape {kernel.shape}) do not split into {groups} groups"
        )
    group_of = np.arange(o) // (o // groups)
    channels: np.ndarray = group_of[:, None] * i + np.arange(i)[None, :]
    return channels


def _unpadded_input_map(
    kernel: np.ndarray, groups: int, padding: int | tuple[int, int], where: str, refusal: str
) -> tuple[np.ndarray, np.ndarray]:
    """For a rule on a conv's input that holds only without padding: FusionError("where: refusal")
    unless padding is 0, else (the kernel as OIHW, _input_channel_of it)."""
    if _pair(padding, "padding") != (0, 0):
        raise FusionError(f"{where}: {refusal}")
    k4 = _as_oihw(kernel, where)
    return k4, _input_channel_of(k4, groups, where)


def _check_vector(name: str, v: np.ndarray | None, length: int, where: str) -> None:
    if v is not None and np.shape(v) != (length,):
        raise FusionError(f"{where}: {name} has shape {np.shape(v)}, expected ({length},)")


def fold_input_constant(
    kernel: np.ndarray,
    bias: np.ndarray | None,
    constant: np.ndarray,
    groups: int,
    padding: int | tuple[int, int],
) -> KernelBias:
    """A per-channel constant c added to the input before a conv (YOLOv7's ImplicitA), folded
    into the conv's bias:

        K * (x + c) + b = K * x + (b + K * c),  and K * c is the same at every output position:
        b'[o] = b[o] + sum_{i,h,w} K[o, i, h, w] c[g(o) * I + i],   K' = K,

    with I = in_channels / groups and g(o) the group of output o. Exact only without padding:
    zero padding pads x + c with 0, not with c, so the border outputs would differ. `bias` None
    is 0; `kernel` may also be a Linear weight (O, I).
    """
    where = "fold_input_constant"
    k4, channels = _unpadded_input_map(
        kernel,
        groups,
        padding,
        where,
        f"a constant added before a conv with padding {padding} cannot be folded exactly: "
        "the padded border reads 0 instead of the constant",
    )
    _check_vector("constant", constant, k4.shape[1] * groups, where)
    _check_vector("bias", bias, k4.shape[0], where)
    per_tap = _f64(constant)[channels]  # (O, I): the constant each kernel row reads
    b = (_f64(bias) if bias is not None else 0.0) + np.einsum("oihw,oi->o", _f64(k4), per_tap)
    dt = _out_dtype(kernel)
    return np.array(kernel, dtype=dt), b.astype(dt, copy=False)


def fuse_bn_conv(
    kernel: np.ndarray,
    bias: np.ndarray | None,
    groups: int,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    padding: int | tuple[int, int],
) -> KernelBias:
    """Fold an eval-mode BN on the input channels into the conv that follows it.

    BN(x)[c] = s[c] x[c] + t[c] with s = gamma / sqrt(var + eps), t = beta - s * mean. For output
    o in group g(o), the conv reads input channel c = g(o) * I + i through K[o, i] (I = C / groups):

        y[o] = sum_{i,h,w} K[o, i, h, w] (s[c] x[c] + t[c]) + b[o]
             = sum_{i,h,w} (K[o, i, h, w] s[c]) x[c] + (b[o] + sum_{i,h,w} K[o, i, h, w] t[c]),

    so K'[o, i] = K[o, i] s[g(o) I + i] (groups = 1: K' = K s[None, :]; depthwise: K'[o] = K[o] s[o])
    and b' = fold_input_constant(K, b, t). Exact only with padding (0, 0): zero padding pads the
    conv's input BN(x) with 0, not with BN(0) = t. `bias` None is 0.
    """
    where = "fuse_bn_conv"
    k4, channels = _unpadded_input_map(
        kernel,
        groups,
        padding,
        where,
        f"a BN before a conv with padding {padding} cannot be fused exactly: zero padding pads "
        "the normalised input with 0, not with BN(0) = beta - gamma * mean / sqrt(var + eps)",
    )
    c = k4.shape[1] * groups
    _check_bn_shapes(
        (gamma, beta, mean, var),
        c,
        f"the conv reads {c} input channels (kernel shape {tuple(np.shape(kernel))}, groups {groups})",
        f"{where}: ",
    )
    s = bn_scale(gamma, var, eps)
    t = _f64(beta) - s * _f64(mean)
    k = _f64(kernel) * s[channels].reshape(k4.shape[:2] + (1,) * (np.ndim(kernel) - 2))
    _, b = fold_input_constant(_f64(kernel), bias, t, groups, 0)
    dt = _out_dtype(kernel)
    return k.astype(dt, copy=False), b.astype(dt, copy=False)


def _check_pointwise(weight: np.ndarray, where: str) -> None:
    """Raise unless `weight` is a Linear weight (O, I) or a 1x1 conv kernel (O, I, 1, 1)."""
    if np.ndim(weight) not in (2, 4) or np.shape(weight)[2:] not in ((), (1, 1)):
        raise FusionError(f"{where}: expected a Linear or 1x1 conv weight, got shape {np.shape(weight)}")


def fuse_bn_linear(
    weight: np.ndarray,
    bias: np.ndarray | None,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
) -> KernelBias:
    """A BN (eval, per input feature) before a Linear (O, I) or a 1x1 conv (O, I, 1, 1), groups 1:

        y = W (s (x - mean) + beta) + b,  s = gamma / sqrt(var + eps)
          => W' = W s[None, :],  b' = b + W (beta - s mean).

    The groups-1, padding-0 case of fuse_bn_conv. `bias` None is 0.
    """
    _check_pointwise(weight, "fuse_bn_linear")
    return fuse_bn_conv(weight, bias, 1, gamma, beta, mean, var, eps, 0)


def fuse_linear_bn(
    weight: np.ndarray,
    bias: np.ndarray | None,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
) -> KernelBias:
    """A BN (eval, per output) after a Linear (O, I) or a 1x1 conv (O, I, 1, 1):

    y = s (W x + b - mean) + beta,  s = gamma / sqrt(var + eps)
      => W' = s[:, None] W,  b' = s (b - mean) + beta      (fuse_conv_bn; `bias` None is 0).
    """
    _check_pointwise(weight, "fuse_linear_bn")
    return fuse_conv_bn(weight, gamma, beta, mean, var, eps, bias)


def merge_heads(heads: Sequence[tuple[np.ndarray, np.ndarray | None]], coefficients: Sequence[float]) -> KernelBias:
    """Parallel Linear (or conv) heads on the same input, combined linearly, as one head:

        sum_i c_i (W_i x + b_i) = (sum_i c_i W_i) x + sum_i c_i b_i

    (averaged distillation heads, as DeiT's: c_i = 1/n). A bias None is 0.
    """
    if not heads:
        raise FusionError("merge_heads needs at least one head")
    if len(coefficients) != len(heads):
        raise FusionError(f"merge_heads: {len(heads)} heads but {len(coefficients)} coefficients")
    shape = np.shape(heads[0][0])
    w = np.zeros(shape)
    b = np.zeros(shape[0])
    for i, ((wi, bi), ci) in enumerate(zip(heads, coefficients)):
        if np.shape(wi) != shape:
            raise FusionError(f"merge_heads: head {i} weight has shape {np.shape(wi)}, head 0 has {shape}")
        _check_vector(f"head {i} bias", bi, shape[0], "merge_heads")
        w += float(ci) * _f64(wi)
        if bi is not None:
            b += float(ci) * _f64(bi)
    dt = _out_dtype(heads[0][0])
    return w.astype(dt, copy=False), b.astype(dt, copy=False)


def dilate_kernel(kernel: np.ndarray, dilation: tuple[int, int]) -> np.ndarray:
    """A kh x kw kernel with dilation (dh, dw) as the dense kernel of the same conv at dilation 1:
    size ((kh - 1) dh + 1) x ((kw - 1) dw + 1), D[..., h dh, w dw] = K[..., h, w] and zeros between
    the taps (a dilated conv reads exactly those taps). Keeps the dtype."""
    dh, dw = _pair(dilation, "dilation")
    if dh < 1 or dw < 1:
        raise FusionError(f"dilate_kernel: dilation must be >= 1, got {dilation}")
    k = np.asarray(kernel)
    if k.ndim < 2:
        raise FusionError(f"dilate_kernel: expected a kernel (..., kh, kw), got shape {k.shape}")
    kh, kw = k.shape[-2:]
    out = np.zeros(k.shape[:-2] + ((kh - 1) * dh + 1, (kw - 1) * dw + 1), dtype=k.dtype)
    out[..., ::dh, ::dw] = k
    return out


def combine_branches(
    branches: Sequence[tuple[float, KernelBias]],
    channel_scale: np.ndarray | None,
    identity: bool,
    groups: int,
) -> KernelBias:
    """Parallel convs (same stride, dilation, groups, padding) combined with coefficients, scaled
    per output channel after the sum, plus an identity after that:

        y = [x if identity] + ls * sum_i c_i (K_i * x + b_i)
          = (ls[o] sum_i c_i K_i + [Id]) * x + ls sum_i c_i b_i,

    Id = identity_kernel(C, groups, k). FastViT's RepMixer x + ls (mixer(x) - norm(x)) is
    coefficients (+1, -1) with channel_scale ls and identity. Kernels must already have one common
    (odd, for the identity) size: pad them with pad_kernel (or dilate_kernel) first. `channel_scale`
    None is 1; the identity needs as many outputs as inputs (O = I * groups).
    """
    if not branches:
        raise FusionError("combine_branches needs at least one branch")
    shape = np.shape(branches[0][1][0])
    if len(shape) != 4:
        raise FusionError(f"combine_branches: expected OIHW kernels, branch 0 has shape {shape}")
    k = np.zeros(shape)
    b = np.zeros(shape[0])
    for i, (ci, (ki, bi)) in enumerate(branches):
        if np.shape(ki) != shape:
            raise FusionError(
                f"combine_branches: branch {i} kernel has shape {np.shape(ki)}, branch 0 has {shape}: "
                "pad the kernels to one size (pad_kernel) first"
            )
        _check_vector(f"branch {i} bias", bi, shape[0], "combine_branches")
        k += float(ci) * _f64(ki)
        b += float(ci) * _f64(bi)
    if channel_scale is not None:
        _check_vector("channel_scale", channel_scale, shape[0], "combine_branches")
        ls = _f64(channel_scale)
        k *= ls[:, None, None, None]
        b *= ls
    if identity:
        if shape[2] != shape[3]:
            raise FusionError(f"combine_branches: the identity needs a square kernel, got {shape[2]}x{shape[3]}")
        if shape[0] != shape[1] * groups:
            raise FusionError(
                f"combine_branches: the identity needs outputs == inputs, kernel {shape} with groups {groups} "
                f"maps {shape[1] * groups} channels to {shape[0]}"
            )
        k += identity_kernel(shape[0], groups, shape[-1])
    dt = _out_dtype(branches[0][1][0])
    return k.astype(dt, copy=False), b.astype(dt, copy=False)
