"""The Flax backend's convolution paths (backends/flax/layers.py) equal XLA's own convolution,
`jax.lax.conv_general_dilated` with `feature_group_count`, over shapes, strides, dilations,
groups and (torch-style symmetric, explicit) paddings."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.flax import layers
from reparam_core.blocks import nodes

EXAMPLES = 25  # each example compiles two small programs


@st.composite
def conv_cases(draw: st.DrawFn, max_cg: int, max_groups: int) -> tuple:
    groups = draw(st.integers(1, max_groups))
    cg = draw(st.integers(1, max_cg))
    og = draw(st.integers(1, 3))
    kh, kw = draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 3]))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 9))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 9))
    n = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, groups * cg), dtype=np.float32)
    k = rng.standard_normal((kh, kw, cg, groups * og), dtype=np.float32)
    return x, k, (sh, sw), ((ph, ph), (pw, pw)), (dh, dw), groups


def reference(x: np.ndarray, k: np.ndarray, strides, padding, dilation, groups) -> np.ndarray:
    return np.asarray(
        jax.lax.conv_general_dilated(
            x,
            k,
            strides,
            padding,
            rhs_dilation=dilation,
            dimension_numbers=layers.NHWC_HWIO,
            feature_group_count=groups,
            precision=jax.lax.Precision.HIGHEST,
        )
    )


def check(y: jax.Array, ref: np.ndarray, k: np.ndarray) -> None:
    """Float rounding of a sum of kh*kw*cg products of unit normals (relative to its scale)."""
    assert y.shape == ref.shape
    terms = k.shape[0] * k.shape[1] * k.shape[2]
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * terms * max(1.0, np.abs(ref).max()))


@settings(max_examples=EXAMPLES)
@given(conv_cases(max_cg=3, max_groups=6))
def test_shifted_conv_equals_xla_grouped_conv(case: tuple) -> None:
    x, k, *args = case
    check(layers.shifted_conv(x, k, *args), reference(x, k, *args), k)


@settings(max_examples=EXAMPLES)
@given(conv_cases(max_cg=4, max_groups=4))
def test_split_conv_equals_xla_grouped_conv(case: tuple) -> None:
    x, k, *args = case
    check(layers.split_conv(x, k, *args), reference(x, k, *args), k)


@settings(max_examples=EXAMPLES)
@given(conv_cases(max_cg=12, max_groups=10))
def test_dispatch_equals_xla_grouped_conv(case: tuple) -> None:
    """Whatever path conv_path picks (shift up to 8 channels per group, split up to 8 groups)."""
    x, k, strides, padding, dilation, groups = case
    y = layers.conv_general_dilated(
        x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=layers.NHWC_HWIO, feature_group_count=groups
    )
    check(y, reference(x, k, strides, padding, dilation, groups), k)


@pytest.mark.parametrize(
    "groups, channels, platform, path",
    [
        (1, 64, "cpu", "xla"),
        (32, 32, "cpu", "shift"),
        (16, 128, "cpu", "shift"),
        (8, 128, "cpu", "split"),
        (2, 64, "cpu", "split"),
        (16, 256, "cpu", "xla"),
        (32, 32, "gpu", "xla"),
    ],
)
def test_conv_path_rule(groups: int, channels: int, platform: str, path: str) -> None:
    assert layers.conv_path(groups, channels, platform) == path


def test_depthwise_module_keeps_nnx_conv_parameters_and_output() -> None:
    """A depthwise 3x3 stride-2 Conv node: nnx.Conv's kernel/bias (HWIO, I = 1), and the output
    of XLA's grouped convolution plus bias, with torch's symmetric padding."""
    node = nodes.Conv("dw", 6, 12, kernel=3, stride=2, padding=1, groups=6, bias=True)
    module = layers.conv(node)
    assert module.kernel[...].shape == (3, 3, 1, 12) and module.bias[...].shape == (12,)
    rng = np.random.default_rng(0)
    module.bias[...] = rng.standard_normal(12, dtype=np.float32)
    x = rng.standard_normal((2, 7, 8, 6), dtype=np.float32)
    k = np.asarray(module.kernel[...])
    ref = reference(x, k, (2, 2), ((1, 1), (1, 1)), (1, 1), 6) + np.asarray(module.bias[...])
    check(module(x), ref, k)
