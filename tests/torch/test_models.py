"""Every registered model built on the meta device: native keys == reparam_core schema (the
models against the oracle run for every backend in tests/backends and parity_tests)."""

from __future__ import annotations

import pytest
import torch

import backends.torch as bt
from reparam_core import get_spec, list_models, state_schema

MODELS = list_models()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_state_keys_and_shapes_equal_schema(name: str, form: str) -> None:
    with torch.device("meta"):
        model = bt.create_model(name, deploy=form == "deploy")
    native = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    schema = state_schema(get_spec(name), form)
    assert list(native) == list(schema)  # same keys in forward order
    assert native == {k: info.shape for k, info in schema.items()}
    assert model.deploy is (form == "deploy")
