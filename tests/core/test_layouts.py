"""Kernel layout converters: exact round trips and the layouts each framework expects."""

from __future__ import annotations

import numpy as np
import pytest

from reparam_core import ShapeMismatchError, get_spec, random_state, state_schema
from reparam_core.weights.layouts import (
    flax_key,
    from_flax,
    from_megengine,
    hwio_to_oihw,
    megengine_to_oihw,
    oihw_to_hwio,
    oihw_to_megengine,
    to_flax,
    to_megengine,
)


@pytest.mark.parametrize("groups", [1, 2, 4, 16])
def test_megengine_round_trip(groups: int) -> None:
    w = np.random.default_rng(groups).normal(size=(16, 32 // groups, 3, 3)).astype(np.float32)
    m = oihw_to_megengine(w, groups)
    assert m.shape == ((16, 32 // groups, 3, 3) if groups == 1 else (groups, 16 // groups, 32 // groups, 3, 3))
    # group g's output o is OIHW output g * O/g + o
    if groups > 1:
        assert np.array_equal(m[1, 0], w[16 // groups])
    assert np.array_equal(megengine_to_oihw(m), w)


def test_hwio_round_trip_and_meaning() -> None:
    w = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    h = oihw_to_hwio(w)
    assert h.shape == (5, 5, 3, 2) and h[1, 4, 2, 1] == w[1, 2, 1, 4]
    assert np.array_equal(hwio_to_oihw(h), w)


def test_bad_layout_shapes() -> None:
    with pytest.raises(ShapeMismatchError, match="4-D"):
        oihw_to_megengine(np.zeros((3, 3)), 1)
    with pytest.raises(ShapeMismatchError, match="divisible"):
        oihw_to_megengine(np.zeros((6, 1, 3, 3)), 4)
    with pytest.raises(ShapeMismatchError):
        megengine_to_oihw(np.zeros((2, 3, 4)))


@pytest.mark.parametrize("name", ["RepVGG-B1g4", "repghostnet_0_5x"])
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_state_round_trips(name: str, form: str) -> None:
    spec = get_spec(name)
    state = random_state(spec, form, seed=3)
    schema = state_schema(spec, form)
    five_d = 0
    for key, info in schema.items():
        m = to_megengine(state[key], info)
        five_d += m.ndim == 5
        if info.kind == "conv.bias":
            assert m.shape == (1, info.shape[0], 1, 1)
        assert np.array_equal(from_megengine(m, info), state[key])
        assert np.array_equal(from_flax(to_flax(state[key], info), info), state[key])
    assert five_d > 0  # grouped / depthwise convs become 5-D


def test_flax_keys() -> None:
    schema = state_schema(get_spec("RepVGG-A0"), "train")
    key = "stage1.0.rbr_dense.bn.running_var"
    assert flax_key(key, schema[key]) == "stage1.0.rbr_dense.bn.var"
    assert (
        flax_key("stage1.0.rbr_dense.conv.weight", schema["stage1.0.rbr_dense.conv.weight"])
        == "stage1.0.rbr_dense.conv.kernel"
    )
    assert flax_key("linear.bias", schema["linear.bias"]) == "linear.bias"
    assert (
        flax_key("stage1.0.rbr_dense.bn.weight", schema["stage1.0.rbr_dense.bn.weight"])
        == "stage1.0.rbr_dense.bn.scale"
    )
