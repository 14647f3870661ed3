"""Property tests of the fusion algebra: the fused conv equals the multi-branch computation of the
float64 oracle to 1e-10 relative, over random block geometries (300 examples each in CI)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from reparam_core import RepBlockSpec, block_kernel_bias
from reparam_core.blocks.fusion import avg_pool_kernel, concat_branches, fuse_1x1_kxk, identity_kernel
from reparam_core.blocks.oracle import block_forward, conv2d
from reparam_core.blocks.schema import block_schema
from reparam_core.weights.state import _random_tensor

REL = 1e-10


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@st.composite
def block_configs(draw) -> tuple[RepBlockSpec, tuple[int, int], int]:
    groups = draw(st.sampled_from([1, 2, 4, 0]))  # 0 = depthwise
    per_in = draw(st.integers(1, 3))
    same = draw(st.booleans())
    cin = per_in * (groups or 1) if groups else draw(st.integers(1, 8))
    g = groups or cin
    cout = cin if same else g * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 3, 5, 7]))
    d = draw(st.integers(1, 3)) if k > 1 else 1
    stride = draw(st.sampled_from([1, 2]))
    extra_pad = draw(st.sampled_from([0, 0, 0, 1, 2]))  # beyond "same": still fusable, no identity
    se = draw(st.sampled_from(["none", "pre", "post"]))
    spec = RepBlockSpec(
        cin,
        cout,
        k,
        stride,
        d,
        g,
        padding=d * (k - 1) // 2 + extra_pad,
        se=se,
        se_channels=draw(st.integers(1, 4)) if se != "none" else 0,
        conv_bias=draw(st.booleans()),
        act=draw(st.sampled_from(["relu", "silu", "identity"])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        naming=draw(st.sampled_from(["repvgg", "repconv"])),
    )
    h = draw(st.integers(max(1, d * (k - 1) + 1 - 2 * spec.padding), 11))
    w = draw(st.integers(max(1, d * (k - 1) + 1 - 2 * spec.padding), 11))
    return spec, (h, w), draw(st.integers(0, 2**31 - 1))


@given(block_configs())
def test_repblock_fused_equals_branches(cfg) -> None:
    spec, (h, w), seed = cfg
    rng = np.random.default_rng(seed)
    params = {k: _random_tensor(rng, info) for k, info in block_schema(spec, "train").items()}
    x = rng.normal(size=(2, spec.in_channels, h, w))
    k, b = block_kernel_bias(spec, params)
    assert k.dtype == np.float64 and k.shape == (
        spec.out_channels,
        spec.in_channels // spec.groups,
        spec.kernel_size,
        spec.kernel_size,
    )
    deploy = {key: v for key, v in params.items() if key.startswith(spec.se_module + ".")} if spec.se != "none" else {}
    deploy.update({"rbr_reparam.weight": k, "rbr_reparam.bias": b})
    y_train = block_forward(spec, params, x, "train")
    y_deploy = block_forward(spec, deploy, x, "deploy")
    assert y_train.shape == y_deploy.shape
    assert rel_err(y_deploy, y_train) <= REL


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 3, 5]), st.integers(0, 2**31 - 1))
def test_fuse_1x1_kxk_equals_sequence(groups: int, cpg: int, dpg: int, k: int, seed: int) -> None:
    """1x1 conv (bias b1) then kxk conv padded with b1 == one kxk conv (DBB transform III)."""
    rng = np.random.default_rng(seed)
    c, d, e = cpg * groups, dpg * groups, groups * rng.integers(1, 3)
    k1, b1 = rng.normal(size=(d, cpg, 1, 1)), rng.normal(size=d)
    k2, b2 = rng.normal(size=(e, dpg, k, k)), rng.normal(size=e)
    x = rng.normal(size=(2, c, 6, 7))
    p = k // 2
    mid = conv2d(x, k1, b1, groups=groups)
    mid = np.pad(mid - b1.reshape(1, -1, 1, 1), ((0, 0), (0, 0), (p, p), (p, p))) + b1.reshape(1, -1, 1, 1)
    want = conv2d(mid, k2, b2, groups=groups)
    kf, bf = fuse_1x1_kxk(k1, b1, k2, b2, groups)
    assert rel_err(conv2d(x, kf, bf, padding=p, groups=groups), want) <= REL


@given(st.integers(1, 6), st.sampled_from([1, 3, 5]), st.integers(0, 2**31 - 1))
def test_avg_pool_kernel_is_average_pooling(c: int, k: int, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(1, c, 7, 8))
    y = conv2d(x, avg_pool_kernel(c, k), stride=1)
    ho, wo = 7 - k + 1, 8 - k + 1
    want = np.stack(
        [[x[0, ch, i : i + k, j : j + k].mean() for j in range(wo)] for ch in range(c) for i in range(ho)]
    ).reshape(1, c, ho, wo)
    assert rel_err(y, want) <= REL


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_concat_branches_is_depth_concat(c: int, o: int, seed: int) -> None:
    """A 1x1 and a 3x3 branch writing disjoint channels == one 3x3 conv (kernels concatenated)."""
    rng = np.random.default_rng(seed)
    a = (rng.normal(size=(o, c, 1, 1)), rng.normal(size=o))
    b = (rng.normal(size=(o + 1, c, 3, 3)), rng.normal(size=o + 1))
    x = rng.normal(size=(1, c, 5, 6))
    k, bias = concat_branches([a, b])
    want = np.concatenate([conv2d(x, *a, padding=0), conv2d(x, *b, padding=1)], axis=1)
    assert rel_err(conv2d(x, k, bias, padding=1), want) <= REL


def test_identity_kernel_any_groups() -> None:
    """Identity for grouped convs: K[i, i mod (C/g), centre] = 1 (not eye(C), the YOLOv7 bug)."""
    rng = np.random.default_rng(0)
    for c, g in [(8, 1), (8, 2), (8, 4), (8, 8), (6, 3)]:
        x = rng.normal(size=(1, c, 5, 6))
        for k in (1, 3, 5):
            y = conv2d(x, identity_kernel(c, g, k), padding=k // 2, groups=g)
            assert np.array_equal(y, x), (c, g, k)
