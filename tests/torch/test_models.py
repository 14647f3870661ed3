"""Every registered model: native keys == reparam_core schema, train and deploy forms against the
float64 oracle, deploy state == reparam_core.reparameterize_state, bit-exact state round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import backends.torch as bt
from reparam_core import get_spec, list_models, oracle, reparameterize_state, state_schema
from torch_testutil import FUSE_RTOL, MODEL_RTOL, loaded_model, model_input, model_state, rel_err

MODELS = list_models()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_state_keys_and_shapes_equal_schema(name: str, form: str) -> None:
    with torch.device("meta"):
        model = bt.create_model(name, deploy=form == "deploy")
    native = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not k.endswith("num_batches_tracked")}
    schema = state_schema(get_spec(name), form)
    assert list(native) == list(schema)  # same keys in forward order
    assert native == {k: info.shape for k, info in schema.items()}
    assert model.deploy is (form == "deploy")


@pytest.mark.parametrize("name", MODELS)
def test_parity_with_oracle_and_core_fusion(name: str) -> None:
    spec = get_spec(name)
    state = model_state(name)
    x = model_input(name)
    model = loaded_model(name, state)

    exported = bt.export_state(model)  # round trip: bit-exact
    assert list(exported) == list(state)
    for k, v in state.items():
        assert exported[k].dtype == np.float32
        np.testing.assert_array_equal(exported[k], v, err_msg=k)

    expected = oracle.forward(spec, state, x, "train")
    y_train = bt.predict(model, x)
    assert y_train.shape == (1, spec.num_classes)
    assert rel_err(y_train, expected) <= MODEL_RTOL

    deploy = bt.reparameterize(model, inplace=True)
    assert deploy.deploy and type(deploy) is type(model)
    assert rel_err(bt.predict(deploy, x), expected) <= MODEL_RTOL

    fused = reparameterize_state(spec, state)
    got = bt.export_state(deploy)
    assert list(got) == list(state_schema(spec, "deploy"))
    for k, v in fused.items():
        scale = max(float(np.abs(v).max()), 1e-12)
        assert float(np.abs(got[k] - v).max()) <= FUSE_RTOL * scale, k
