"""Flax-specific model checks: native NNX state paths == flax_key(schema) with HWIO shapes, fresh
models predict (the models against the oracle run for every backend in tests/backends and
parity_tests)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from flax_testutil import model_input

import backends.flax as bf
from backends.flax.state import variables
from reparam_core import get_spec, state_schema
from reparam_core.weights.layouts import flax_key, to_flax


def assert_native_paths_equal_schema(model, name: str, form: str) -> None:
    """Every Param/BatchStat path (joined with ".") is flax_key(canonical key), shapes HWIO."""
    assert model.deploy is (form == "deploy")
    schema = state_schema(get_spec(name, model.spec.num_classes), form)
    native = {k: tuple(v.get_value().shape) for k, v in variables(model).items()}
    expected = {flax_key(k, info): to_flax(np.zeros(info.shape, np.float32), info).shape for k, info in schema.items()}
    assert native == expected


@pytest.mark.parametrize("name", ["RepVGG-mini"])
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_create_model_native_paths_equal_schema(name: str, form: str) -> None:
    model = bf.create_model(name, num_classes=10, deploy=form == "deploy", rngs=nnx.Rngs(1))
    assert_native_paths_equal_schema(model, name, form)
    native = bf.native_state(model)
    assert list(native) == [flax_key(k, i) for k, i in state_schema(model.spec, form).items()]
    for k, v in native.items():
        assert v.dtype == np.float32 and np.isfinite(v).all(), k


def test_create_model_repghostnet_deploy_predicts() -> None:
    """Fresh init (not a loaded state) in deploy form: native keys and a finite forward."""
    model = bf.create_model("repghostnet_0_5x", num_classes=10, deploy=True)
    assert_native_paths_equal_schema(model, "repghostnet_0_5x", "deploy")
    y = bf.predict(model, model_input("repghostnet_0_5x", batch=2))
    assert y.shape == (2, 10) and np.isfinite(y).all()
