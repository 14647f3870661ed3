"""Every registered model: native naming == canonical schema, neutral round trip, conversion;
grouped kernels are 5-D natively."""

from __future__ import annotations

import numpy as np
import pytest

from backends.megengine import create_model, export_state, load_state, model_from_spec, reparameterize
from reparam_core import get_spec, list_models, random_state, state_schema
from reparam_core.families.specs import repvgg_spec
from reparam_core.weights.layouts import to_megengine

NUM_CLASSES = 10
# full-size models (RepVGG-B3, D2se, RepVGGplus-L2pse): the root conftest releases memory after
# each test, so that the process's peak is one model's, not what the allocators kept of the others
pytestmark = pytest.mark.release_memory_per_test


@pytest.mark.parametrize("name", list_models())
def test_model_native_state_and_conversion(name):
    """MegEngine-native checks of every model (the oracle comparisons run for every backend in
    tests/backends and parity_tests): native naming and shapes, exact neutral round trip,
    conversion to a new deploy model of the same class that leaves its input untouched."""
    spec = get_spec(name, NUM_CLASSES)
    state = random_state(spec, "train", seed=3)
    model = create_model(name, num_classes=NUM_CLASSES)
    assert model.deploy is False

    # native naming and MegEngine shapes == canonical schema through layouts.to_megengine
    schema = state_schema(spec, "train")
    native = model.state_dict()
    assert set(native) == set(schema)
    for k, info in schema.items():
        assert tuple(native[k].shape) == to_megengine(np.zeros(info.shape, np.float32), info).shape, k
    del native  # a full copy of the weights: each model's peak stays a few copies (RepVGGplus-L2pse: 544 MB)

    load_state(model, state)
    back = export_state(model)
    assert list(back) == list(schema)
    for k in schema:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], state[k]), k
    del back

    deployed = reparameterize(model)
    assert deployed is not model and deployed.deploy and type(deployed) is type(model)
    assert model.deploy is False and set(model.state_dict()) == set(schema)  # input untouched
    untouched = export_state(model)  # once, not once per key
    assert all(np.array_equal(untouched[k], state[k]) for k in schema)
    del untouched
    assert reparameterize(deployed) is deployed
    dschema = state_schema(spec, "deploy")
    assert set(deployed.state_dict()) == set(dschema)
    assert list(export_state(deployed)) == list(dschema)


def test_grouped_model_native_state_is_5d_and_round_trips():
    # same structure as RepVGG-B1g4 (groups=4 on the official layers), small widths for speed
    spec = repvgg_spec("RepVGG-g4-small", (2, 2, 2, 1), (0.5, 0.5, 0.5, 0.5), groups=4, num_classes=NUM_CLASSES)
    for form in ("train", "deploy"):
        schema = state_schema(spec, form)
        state = random_state(spec, form, seed=5)
        model = load_state(model_from_spec(spec, deploy=form == "deploy"), state)
        native = model.state_dict()
        grouped = [k for k, i in schema.items() if i.kind == "conv.weight" and i.groups > 1]
        assert grouped
        for k in grouped:
            g = schema[k].groups
            o, i, kh, kw = schema[k].shape
            assert native[k].shape == (g, o // g, i, kh, kw), k
            np.testing.assert_array_equal(native[k].reshape(o, i, kh, kw), state[k])
        bias = [k for k, i in schema.items() if i.kind == "conv.bias"]
        for k in bias:
            assert native[k].shape == (1, schema[k].shape[0], 1, 1)
        back = export_state(model)
        assert all(np.array_equal(back[k], state[k]) and back[k].shape == state[k].shape for k in schema)
        again = export_state(load_state(model_from_spec(spec, deploy=form == "deploy"), back))
        assert all(np.array_equal(again[k], state[k]) for k in schema)
