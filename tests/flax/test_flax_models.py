"""Every registered model: native NNX state paths == flax_key(schema), train and deploy forms
against the float64 oracle, deploy state == reparam_core.reparameterize_state, bit-exact state
round trip. Inputs are 1x3x32x32 (the 2-core budget; every model reaches 1x1 at stage 4)."""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import backends.flax as bf
from backends.flax.state import variables
from flax_testutil import (FUSE_RTOL, loaded_model, model_input, model_state, model_tolerance,
                           rel_err)
from reparam_core import get_spec, list_models, oracle, reparameterize_state, state_schema
from reparam_core.layouts import flax_key, to_flax

MODELS = list_models()
MEASURED: dict[str, tuple[float, float]] = {}


def assert_native_paths_equal_schema(model, name: str, form: str) -> None:
    """Every Param/BatchStat path (joined with ".") is flax_key(canonical key), shapes HWIO."""
    assert model.deploy is (form == "deploy")
    schema = state_schema(get_spec(name, model.spec.num_classes), form)
    native = {k: tuple(v.get_value().shape) for k, v in variables(model).items()}
    expected = {flax_key(k, info): to_flax(np.zeros(info.shape, np.float32), info).shape
                for k, info in schema.items()}
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


@pytest.mark.parametrize("name", MODELS)
def test_parity_with_oracle_and_core_fusion(name: str) -> None:
    spec = get_spec(name)
    state = model_state(name)
    x = model_input(name)
    model = loaded_model(name, state)
    assert_native_paths_equal_schema(model, name, "train")
    tol = model_tolerance(spec)

    exported = bf.export_state(model)  # round trip: bit-exact, schema order
    assert list(exported) == list(state)
    for k, v in state.items():
        assert exported[k].dtype == np.float32
        np.testing.assert_array_equal(exported[k], v, err_msg=k)

    expected = oracle.forward(spec, state, x, "train")
    y_train = bf.predict(model, x)
    assert y_train.shape == (1, spec.num_classes)
    e_train = rel_err(y_train, expected)
    assert e_train <= tol

    deploy = bf.reparameterize(model)
    assert type(deploy) is type(model) and not model.deploy
    assert_native_paths_equal_schema(deploy, name, "deploy")
    e_deploy = rel_err(bf.predict(deploy, x), expected)
    assert e_deploy <= tol
    MEASURED[name] = (e_train, e_deploy)
    print(f"\n{name}: rel err train {e_train:.2e} deploy {e_deploy:.2e} (tol {tol:.1e})")

    fused = reparameterize_state(spec, state)
    got = bf.export_state(deploy)
    assert list(got) == list(state_schema(spec, "deploy"))
    for k, v in fused.items():
        scale = max(float(np.abs(v).max()), 1e-12)
        assert float(np.abs(got[k] - v).max()) <= FUSE_RTOL * scale, k
