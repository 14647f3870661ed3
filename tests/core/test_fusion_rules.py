"""Property tests of the issue-25 fusion rules (reparam_core.blocks.fusion): a BN before or after a
Linear / 1x1 conv, a BN before a kxk grouped conv, merged Linear heads, dilated kernels, branch
combinations with layer scale and identity (RepMixer), a constant added to a conv's input
(ImplicitA). Each fused result is compared, at 1e-10 relative in float64, with a direct numpy
evaluation of the unfused computation; the refusals (padding, shapes) are checked by message."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reparam_core import FusionError
from reparam_core.blocks.fusion import (
    combine_branches,
    dilate_kernel,
    fold_input_constant,
    fuse_bn_conv,
    fuse_bn_linear,
    fuse_linear_bn,
    merge_heads,
    pad_kernel,
)
from reparam_core.blocks.oracle import conv2d

REL = 1e-10
SEEDS = st.integers(0, 2**31 - 1)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def bn_params(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """gamma, beta, mean, var with var well away from 0 (the BN of a trained net)."""
    return rng.uniform(0.4, 1.2, n), rng.normal(size=n), rng.normal(size=n), rng.uniform(0.5, 2.0, n)


def bn_eval(x: np.ndarray, bn: tuple[np.ndarray, ...], eps: float, axis: int) -> np.ndarray:
    """Inference BN along `axis`: gamma (x - mean) / sqrt(var + eps) + beta."""
    shape = [1] * x.ndim
    shape[axis] = -1
    gamma, beta, mean, var = (v.reshape(shape) for v in bn)
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """y[n, o] = sum_i W[o, i] x[n, i] + b[o], as loops over the output feature."""
    y = np.stack([x @ w[o] for o in range(w.shape[0])], axis=1)
    return y if b is None else y + b


EPS = st.sampled_from([1e-5, 1e-3, 0.1])


@given(st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans(), EPS, SEEDS)
def test_fuse_bn_linear_equals_bn_then_linear(i: int, o: int, has_bias: bool, conv: bool, eps: float, seed: int):
    rng = np.random.default_rng(seed)
    w, b, bn = rng.normal(size=(o, i)), rng.normal(size=o) if has_bias else None, bn_params(rng, i)
    x = rng.normal(size=(5, i))
    want = linear(bn_eval(x, bn, eps, 1), w, b)
    wf, bf = fuse_bn_linear(w[:, :, None, None] if conv else w, b, *bn, eps)
    assert wf.shape == ((o, i, 1, 1) if conv else (o, i)) and wf.dtype == np.float64
    assert rel_err(linear(x, wf.reshape(o, i), bf), want) <= REL


@given(st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans(), EPS, SEEDS)
def test_fuse_linear_bn_equals_linear_then_bn(i: int, o: int, has_bias: bool, conv: bool, eps: float, seed: int):
    rng = np.random.default_rng(seed)
    w, b, bn = rng.normal(size=(o, i)), rng.normal(size=o) if has_bias else None, bn_params(rng, o)
    x = rng.normal(size=(5, i))
    want = bn_eval(linear(x, w, b), bn, eps, 1)
    wf, bf = fuse_linear_bn(w[:, :, None, None] if conv else w, b, *bn, eps)
    assert wf.shape == ((o, i, 1, 1) if conv else (o, i))
    assert rel_err(linear(x, wf.reshape(o, i), bf), want) <= REL


@given(st.sampled_from([1, 2, 3, 0]), st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 3, (1, 3)]), EPS, SEEDS)
def test_fuse_bn_conv_equals_bn_then_grouped_conv(groups: int, ipg: int, opg: int, k, eps: float, seed: int):
    """groups 0 = depthwise; an unpadded kxk (also non-square) conv after a BN on its input."""
    rng = np.random.default_rng(seed)
    g = groups or 4
    ipg = 1 if groups == 0 else ipg
    kh, kw = (k, k) if isinstance(k, int) else k
    c, o = g * ipg, g * opg
    kernel, b, bn = rng.normal(size=(o, ipg, kh, kw)), rng.normal(size=o), bn_params(rng, c)
    x = rng.normal(size=(2, c, 6, 7))
    want = conv2d(bn_eval(x, bn, eps, 1), kernel, b, groups=g)
    kf, bf = fuse_bn_conv(kernel, b, g, *bn, eps, (0, 0))
    assert rel_err(conv2d(x, kf, bf, groups=g), want) <= REL


def test_fuse_bn_conv_refuses_padding_and_wrong_channels() -> None:
    rng = np.random.default_rng(0)
    kernel, bn = rng.normal(size=(4, 2, 3, 3)), bn_params(rng, 4)
    with pytest.raises(FusionError, match=r"padding \(1, 1\).*pads the normalised input with 0, not with BN\(0\)"):
        fuse_bn_conv(kernel, None, 2, *bn, 1e-5, (1, 1))
    with pytest.raises(FusionError, match=r"gamma has shape \(4,\), the conv reads 2 input channels"):
        fuse_bn_conv(kernel, None, 1, *bn, 1e-5, 0)
    with pytest.raises(FusionError, match=r"4 output channels .* do not split into 3 groups"):
        fuse_bn_conv(kernel, None, 3, *bn_params(rng, 6), 1e-5, 0)
    with pytest.raises(FusionError, match=r"channel 1 has running_var=-1.0"):
        fuse_bn_conv(kernel, None, 2, bn[0], bn[1], bn[2], np.array([1.0, -1.0, 1.0, 1.0]), 0.0, 0)
    with pytest.raises(FusionError, match=r"Linear or 1x1 conv weight, got shape \(4, 2, 3, 3\)"):
        fuse_bn_linear(kernel, None, *bn_params(rng, 2), 1e-5)


def test_bn_before_a_padded_conv_is_really_not_a_conv() -> None:
    """Why fuse_bn_conv refuses padding: the unpadded fusion applied with padding 1 is wrong on
    the border (by K * BN(0) there) and right inside."""
    rng = np.random.default_rng(1)
    kernel, bn = rng.normal(size=(3, 3, 3, 3)), bn_params(rng, 3)
    x = rng.normal(size=(1, 3, 6, 6))
    want = conv2d(bn_eval(x, bn, 1e-5, 1), kernel, padding=1)
    kf, bf = fuse_bn_conv(kernel, None, 1, *bn, 1e-5, 0)
    got = conv2d(x, kf, bf, padding=1)
    assert rel_err(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1]) <= REL
    assert np.abs(got - want)[..., 0, :].max() > 1e-3


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.booleans(), SEEDS)
def test_merge_heads_equals_weighted_sum_of_heads(n: int, i: int, o: int, average: bool, seed: int):
    rng = np.random.default_rng(seed)
    heads = [(rng.normal(size=(o, i)), rng.normal(size=o) if j % 2 == 0 else None) for j in range(n)]
    coef = [1.0 / n] * n if average else list(rng.normal(size=n))
    x = rng.normal(size=(3, i))
    want = sum(c * linear(x, w, b) for c, (w, b) in zip(coef, heads))
    w, b = merge_heads(heads, coef)
    assert rel_err(linear(x, w, b), want) <= REL


def test_merge_heads_averages_distillation_heads_exactly() -> None:
    w1, w2 = np.array([[1.0, 2.0]]), np.array([[3.0, -2.0]])
    w, b = merge_heads([(w1, np.array([1.0])), (w2, np.array([3.0]))], [0.5, 0.5])
    assert np.array_equal(w, [[2.0, 0.0]]) and np.array_equal(b, [2.0])
    with pytest.raises(FusionError, match=r"head 1 weight has shape \(2, 2\), head 0 has \(1, 2\)"):
        merge_heads([(w1, None), (np.ones((2, 2)), None)], [1, 1])
    with pytest.raises(FusionError, match="2 heads but 1 coefficients"):
        merge_heads([(w1, None), (w2, None)], [1.0])


@given(
    st.sampled_from([1, 2, 3]),
    st.sampled_from([(1, 1), (2, 2), (3, 3), (2, 3), (1, 4)]),
    st.integers(1, 3),
    st.integers(0, 2),
    SEEDS,
)
def test_dilated_conv_equals_dense_dilated_kernel(k: int, d: tuple[int, int], groups: int, extra: int, seed: int):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(2 * groups, 2, k, k))
    x = rng.normal(size=(2, 2 * groups, 13, 14))
    pad = (d[0] * (k - 1) // 2 + extra, d[1] * (k - 1) // 2 + extra)
    dense = dilate_kernel(kernel, d)
    assert dense.shape[2:] == ((k - 1) * d[0] + 1, (k - 1) * d[1] + 1)
    want = conv2d(x, kernel, padding=pad, dilation=d, groups=groups)
    assert rel_err(conv2d(x, dense, padding=pad, groups=groups), want) <= REL


def test_dilate_kernel_places_taps() -> None:
    k = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)
    dense = dilate_kernel(k, (2, 3))
    assert dense.dtype == np.float32 and dense.shape == (1, 1, 5, 7)
    assert np.array_equal(dense[0, 0, ::2, ::3], k[0, 0]) and dense.sum() == k.sum()
    assert np.count_nonzero(dense) == 9
    assert np.array_equal(dilate_kernel(k, (1, 1)), k)
    with pytest.raises(FusionError, match=r"dilation must be >= 1, got \(0, 2\)"):
        dilate_kernel(k, (0, 2))


@given(st.sampled_from([1, 2, 0]), st.integers(1, 3), st.booleans(), st.booleans(), SEEDS)
def test_combine_branches_is_repmixer(groups: int, cpg: int, identity: bool, scaled: bool, seed: int):
    """x + ls * (mixer(x) - norm(x)) with a 3x3 mixer and a 1x1 norm (padded to 3x3), grouped or
    depthwise (groups 0), and random extra coefficients."""
    rng = np.random.default_rng(seed)
    g = groups or 5
    cpg = 1 if groups == 0 else cpg
    c = g * cpg
    mixer = (rng.normal(size=(c, cpg, 3, 3)), rng.normal(size=c))
    norm = (rng.normal(size=(c, cpg, 1, 1)), rng.normal(size=c))
    other = (rng.normal(size=(c, cpg, 3, 3)), rng.normal(size=c))
    coef = (1.0, -1.0, float(rng.normal()))
    ls = rng.normal(size=c) if scaled else None
    x = rng.normal(size=(2, c, 6, 5))
    parts = [conv2d(x, mixer[0], mixer[1], padding=1, groups=g), conv2d(x, *norm, groups=g)]
    parts.append(conv2d(x, *other, padding=1, groups=g))
    total = sum(ci * p for ci, p in zip(coef, parts))
    want = (total if ls is None else ls.reshape(1, -1, 1, 1) * total) + (x if identity else 0.0)
    norm3 = (pad_kernel(norm[0], 3), norm[1])
    k, b = combine_branches(list(zip(coef, (mixer, norm3, other))), ls, identity, g)
    assert rel_err(conv2d(x, k, b, padding=1, groups=g), want) <= REL


def test_combine_branches_refusals_and_dtype() -> None:
    rng = np.random.default_rng(2)
    k3 = (rng.normal(size=(4, 4, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32))
    k1 = (rng.normal(size=(4, 4, 1, 1)), rng.normal(size=4))
    k, b = combine_branches([(1.0, k3)], None, True, 1)
    assert k.dtype == np.float32 and b.dtype == np.float32
    assert k[2, 2, 1, 1] == np.float32(np.float64(k3[0][2, 2, 1, 1]) + 1.0)
    with pytest.raises(FusionError, match=r"branch 1 kernel has shape \(4, 4, 1, 1\), .* pad the kernels"):
        combine_branches([(1.0, k3), (1.0, k1)], None, False, 1)
    with pytest.raises(FusionError, match=r"identity needs outputs == inputs.* maps 8 channels to 4"):
        combine_branches([(1.0, k3)], None, True, 2)
    with pytest.raises(FusionError, match=r"channel_scale has shape \(3,\), expected \(4,\)"):
        combine_branches([(1.0, k3)], np.ones(3), False, 1)


@given(st.sampled_from([1, 2, 3]), st.integers(1, 3), st.sampled_from([1, 3]), st.booleans(), SEEDS)
def test_fold_input_constant_is_implicit_a(groups: int, ipg: int, k: int, has_bias: bool, seed: int):
    rng = np.random.default_rng(seed)
    c, o = groups * ipg, groups * rng.integers(1, 3)
    kernel, b, const = rng.normal(size=(o, ipg, k, k)), rng.normal(size=o) if has_bias else None, rng.normal(size=c)
    x = rng.normal(size=(2, c, 6, 7))
    want = conv2d(x + const.reshape(1, -1, 1, 1), kernel, b, groups=groups)
    kf, bf = fold_input_constant(kernel, b, const, groups, (0, 0))
    assert np.array_equal(kf, kernel)
    assert rel_err(conv2d(x, kf, bf, groups=groups), want) <= REL


def test_fold_input_constant_refusals_and_linear() -> None:
    w, c = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), np.array([1.0, -1.0])
    kf, bf = fold_input_constant(w, None, c, 1, 0)
    assert kf.dtype == np.float32 and np.array_equal(bf, np.array([-1.0, -1.0], np.float32))
    with pytest.raises(FusionError, match=r"padding \(0, 1\) cannot be folded exactly: the padded border reads 0"):
        fold_input_constant(w[:, :, None, None], None, c, 1, (0, 1))
    with pytest.raises(FusionError, match=r"constant has shape \(2,\), expected \(4,\)"):
        fold_input_constant(w, None, c, 2, 0)
