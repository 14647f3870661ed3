"""The oracle against a naive convolution; whole-model conversion in numpy; state checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from reparam_core import (
    CheckpointError,
    FusionError,
    RepBlockSpec,
    ShapeMismatchError,
    check_state,
    detect_form,
    get_spec,
    list_models,
    random_state,
    reparameterize_state,
)
from reparam_core.blocks.fusion import branch_padding, fuse_conv_bn, pad_kernel
from reparam_core.blocks.oracle import conv2d, forward


def naive_conv(x, w, b, stride, padding, dilation, groups):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for oc, i, j in itertools.product(range(o), range(ho), range(wo)):
        g = oc // (o // groups)
        patch = xp[
            :,
            g * cg : (g + 1) * cg,
            i * stride : i * stride + dilation * (kh - 1) + 1 : dilation,
            j * stride : j * stride + dilation * (kw - 1) + 1 : dilation,
        ]
        out[:, oc, i, j] = (patch * w[oc]).sum(axis=(1, 2, 3)) + (b[oc] if b is not None else 0)
    return out


@pytest.mark.parametrize(
    "stride,padding,dilation,groups,k",
    [(1, 1, 1, 1, 3), (2, 1, 1, 2, 3), (1, 2, 2, 4, 3), (2, 0, 1, 8, 1), (1, 3, 1, 1, 7), (3, 2, 2, 2, 5)],
)
def test_conv2d_matches_naive(stride, padding, dilation, groups, k) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 9, 11))
    w = rng.normal(size=(8, 8 // groups, k, k))
    b = rng.normal(size=8)
    got = conv2d(x, w, b, stride, padding, dilation, groups)
    want = naive_conv(x, w, b, stride, padding, dilation, groups)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list_models())
def test_reparameterize_state_preserves_function(name: str) -> None:
    spec = get_spec(name, num_classes=10)
    state = random_state(spec, "train", seed=7, dtype=np.float64)
    deploy = reparameterize_state(spec, state)
    assert check_state(spec, deploy) == "deploy"
    x = np.random.default_rng(1).normal(size=(1, 3, 32, 32))
    y_train = forward(spec, state, x, "train")
    y_deploy = forward(spec, deploy, x, "deploy")
    assert np.abs(y_train - y_deploy).max() <= 1e-10 * np.abs(y_train).max()


def test_fusion_errors_are_clear() -> None:
    with pytest.raises(FusionError, match="channel 1 has running_var=-2.0"):
        fuse_conv_bn(np.ones((2, 1, 1, 1)), np.ones(2), np.zeros(2), np.zeros(2), np.array([1.0, -2.0]), 1e-5)
    with pytest.raises(FusionError, match="shape"):
        fuse_conv_bn(np.ones((3, 1, 1, 1)), np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), 1e-5)
    with pytest.raises(FusionError, match="does not line up"):
        branch_padding(3, 0, 1, 1)  # a 'valid' 3x3 conv: the 1x1 branch would need padding -1
    with pytest.raises(FusionError, match="does not line up"):
        RepBlockSpec(8, 8, 5, padding=1)
    with pytest.raises(FusionError, match="cannot centre"):
        pad_kernel(np.ones((1, 1, 2, 2)), 3)
    with pytest.raises(FusionError, match="divisible by groups"):
        RepBlockSpec(6, 8, groups=4)


def test_running_var_zero_is_carried_by_eps() -> None:
    k, b = fuse_conv_bn(np.ones((1, 1, 1, 1)), np.ones(1), np.zeros(1), np.zeros(1), np.zeros(1), 1e-5)
    assert np.isfinite(k).all() and np.isclose(k[0, 0, 0, 0], 1 / np.sqrt(1e-5))


def test_fusion_keeps_caller_dtype_and_conv_bias() -> None:
    k = np.ones((2, 1, 3, 3), np.float32)
    kf, bf = fuse_conv_bn(
        k, np.full(2, 2.0), np.ones(2), np.full(2, 0.5), np.full(2, 3.0), 1.0, bias=np.array([1.0, 2.0], np.float32)
    )
    assert kf.dtype == np.float32 and bf.dtype == np.float32
    # b' = beta + gamma (b - mean) / sqrt(var + eps) = 1 + 2 (b - 0.5) / 2
    np.testing.assert_allclose(bf, [1.5, 2.5])


def test_check_state_names_the_fault() -> None:
    spec = get_spec("RepVGG-A0")
    state = random_state(spec, "train")
    bad = dict(state)
    del bad["stage1.0.rbr_1x1.bn.weight"]
    with pytest.raises(CheckpointError, match="missing key.*stage1.0.rbr_1x1.bn.weight"):
        check_state(spec, bad, "train")
    bad = dict(state, **{"stage0.rbr_dense.conv.weight": np.zeros((48, 3, 1, 1), np.float32)})
    with pytest.raises(ShapeMismatchError, match=r"stage0.rbr_dense.conv.weight \(48, 3, 1, 1\)"):
        check_state(spec, bad, "train")
    bad = dict(state)
    bad["linear.bias"] = bad["linear.bias"].copy()
    bad["linear.bias"][3] = np.nan
    with pytest.raises(CheckpointError, match="linear.bias holds 1 NaN"):
        check_state(spec, bad, "train")
    bad = dict(state)
    bad["stage1.1.rbr_identity.running_var"] = -np.ones(48, np.float32)
    with pytest.raises(CheckpointError, match="negative"):
        check_state(spec, bad, "train")
    deploy = reparameterize_state(spec, state)
    with pytest.raises(CheckpointError, match="deploy-form checkpoint"):
        check_state(spec, deploy, "train")
    assert detect_form(spec, deploy) == "deploy"
    with pytest.raises(ShapeMismatchError, match=r"A1.*stage0.rbr_dense.conv.weight \(48, 3, 3, 3\) != \(64"):
        check_state(get_spec("RepVGG-A1"), state, "train")
    with pytest.raises(CheckpointError, match="does not match RepVGG-B0.*missing key.*stage1.2"):
        check_state(get_spec("RepVGG-B0"), state, "train")
