"""Numerical edge cases: zero variance, zero gamma, huge means; half-precision casting."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from reparam_core import get_spec, random_state, reparameterize_state
from reparam_core.blocks.oracle import forward
from reparam_core.weights.precision import PrecisionWarning, cast_state, round_bfloat16


def test_round_bfloat16_matches_definition() -> None:
    x = np.array([1.0, 1.00390625, 1.01171875, -3.14159, 65504.0, 1e-30, np.inf], np.float32)
    r = round_bfloat16(x)
    assert np.all(r.view(np.uint32) & 0xFFFF == 0)  # representable in bfloat16
    assert r[0] == 1.0 and r[1] == 1.0  # 1 + 2^-8 is a tie: rounds to even (1.0)
    assert r[2] == np.float32(1.015625)  # 1 + 3 * 2^-8: a tie, rounds up to the even 1 + 4 * 2^-8
    assert np.isinf(r[-1])
    assert abs(r[3] - x[3]) / abs(x[3]) <= 2**-8


def test_edge_case_bn_statistics_stay_exact() -> None:
    spec = get_spec("RepVGG-mini", num_classes=10)
    state = random_state(spec, "train", seed=5, dtype=np.float64)
    state["stage1.0.rbr_dense.bn.running_var"][:4] = 0.0  # eps carries it
    state["stage1.0.rbr_1x1.bn.weight"][:4] = 0.0  # gamma 0 kills the branch
    state["stage2.1.rbr_identity.running_mean"][:3] = 1e4  # huge means
    deploy = reparameterize_state(spec, state)
    assert all(np.isfinite(v).all() for v in deploy.values())
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32))
    y, yd = forward(spec, state, x, "train"), forward(spec, deploy, x, "deploy")
    assert np.abs(y - yd).max() <= 1e-10 * np.abs(y).max()


@pytest.mark.parametrize("dtype,bound", [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_half_precision_error_is_measured(dtype: str, bound: float) -> None:
    spec = get_spec("RepVGG-mini", num_classes=10)
    deploy = reparameterize_state(spec, random_state(spec, "train", seed=1, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing overflows here
        half, report = cast_state(deploy, dtype)
    assert 0 < report.max_rel_error <= bound and report.overflowed == ()
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32))
    y = forward(spec, deploy, x, "deploy")
    yh = forward(spec, half, x, "deploy")
    assert np.abs(yh - y).max() / np.abs(y).max() < 50 * bound  # error through 7 layers


def test_overflow_warns_with_the_key() -> None:
    spec = get_spec("RepVGG-mini", num_classes=10)
    state = random_state(spec, "train", seed=2, dtype=np.float64)
    state["stage0.rbr_dense.bn.running_var"][:] = 0.0
    state["stage0.rbr_dense.bn.weight"][:] = 1e3  # gamma / sqrt(eps) ~ 3e5 > float16 max
    deploy = reparameterize_state(spec, state)
    with pytest.warns(PrecisionWarning, match="stage0.rbr_reparam.weight"):
        _, report = cast_state(deploy, "float16")
    assert "stage0.rbr_reparam.weight" in report.overflowed
