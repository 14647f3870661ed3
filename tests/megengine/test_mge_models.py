"""Every registered model: native naming == canonical schema, neutral round trip, train and deploy
forward vs the float64 oracle, deploy state == reparameterize_state."""
from __future__ import annotations

import numpy as np
import pytest

from backends.megengine import (create_model, export_state, load_state, model_from_spec, predict,
                                reparameterize)
from mge_testutil import MODEL_RTOL, STATE_RTOL, rand_input, rel_err
from reparam_core import (CheckpointError, ShapeMismatchError, get_spec, list_models, oracle,
                          random_state, repblock_kernel_bias, reparameterize_state,
                          state_schema)
from reparam_core.layouts import to_megengine
from reparam_core.specs import repvgg_spec

NUM_CLASSES = 10
# Big RepVGGs are slow in MegEngine on CPU: 32x32 for the RepVGG family, 64x64 for RepGhostNet.
SIZE = {n: (64 if n.startswith("repghostnet") else 32) for n in list_models()}
MAX_ERR: dict[str, float] = {}
# The largest models (tens of millions of weights) get the same forward checks, but their deploy
# state is compared block by block on a sample (stem, first and last block of every stage, head)
# instead of through a whole reparameterize_state, and no second deploy model is built: keeps the
# suite within its time budget on 2 shared cores.
HEAVY = {"RepVGG-B1", "RepVGG-B2", "RepVGG-B2g2", "RepVGG-B2g4", "RepVGG-B3", "RepVGG-B3g2",
         "RepVGG-B3g4", "RepVGG-D2se", "RepVGGplus-L2pse"}


def _sampled_expected(spec, state):
    """Expected deploy tensors for a sample of blocks, through reparam_core.equivalent."""
    keep = {"stage0"}
    for st in spec.stages:
        keep |= {spec.block_prefix(st.name, 0), spec.block_prefix(st.name, len(st.blocks) - 1)}
    out = {k: state[k] for k in ("linear.weight", "linear.bias")}
    for prefix, b in spec.blocks():
        if prefix in keep:
            sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            kernel, bias = repblock_kernel_bias(b, sub)
            out[f"{prefix}.rbr_reparam.weight"], out[f"{prefix}.rbr_reparam.bias"] = kernel, bias
    return out


@pytest.mark.parametrize("name", list_models())
def test_model_parity_and_state(name):
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

    load_state(model, state)
    back = export_state(model)
    assert list(back) == list(schema)
    for k in schema:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], state[k]), k

    x = rand_input((1, 3, SIZE[name], SIZE[name]))
    ref = oracle.forward(spec, state, x, "train")
    err_train = rel_err(predict(model, x), ref)
    assert err_train <= MODEL_RTOL, (name, err_train)

    deployed = reparameterize(model)
    assert deployed is not model and deployed.deploy and type(deployed) is type(model)
    assert model.deploy is False and set(model.state_dict()) == set(schema)  # input untouched
    assert reparameterize(deployed) is deployed
    dschema = state_schema(spec, "deploy")
    assert set(deployed.state_dict()) == set(dschema)
    dstate = export_state(deployed)
    expected = _sampled_expected(spec, state) if name in HEAVY else reparameterize_state(spec, state)
    assert list(dstate) == list(dschema)
    for k in expected:
        scale = max(float(np.abs(expected[k]).max()), 1e-12)
        assert float(np.abs(dstate[k] - expected[k]).max()) <= STATE_RTOL * scale, k
    err_deploy = rel_err(predict(deployed, x), ref)
    assert err_deploy <= MODEL_RTOL, (name, err_deploy)
    MAX_ERR[name] = max(err_train, err_deploy)
    print(f"{name}: train {err_train:.2e} deploy {err_deploy:.2e}")

    if name in HEAVY:
        return
    # a deploy-form model built directly loads the deploy state and agrees
    fresh = create_model(name, num_classes=NUM_CLASSES, deploy=True)
    load_state(fresh, expected)
    assert rel_err(predict(fresh, x), ref) <= MODEL_RTOL


def test_grouped_model_native_state_is_5d_and_round_trips():
    # same structure as RepVGG-B1g4 (groups=4 on the official layers), small widths for speed
    spec = repvgg_spec("RepVGG-g4-small", (2, 2, 2, 1), (0.5, 0.5, 0.5, 0.5), groups=4,
                       num_classes=NUM_CLASSES)
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
        assert all(np.array_equal(back[k], state[k]) and back[k].shape == state[k].shape
                   for k in schema)
        again = export_state(load_state(model_from_spec(spec, deploy=form == "deploy"), back))
        assert all(np.array_equal(again[k], state[k]) for k in schema)


def test_load_state_validation():
    spec = get_spec("RepVGG-mini", NUM_CLASSES)
    model = create_model("RepVGG-mini", num_classes=NUM_CLASSES)
    state = random_state(spec, "train", seed=0)
    state_nbt = {**state, "stage0.rbr_dense.bn.num_batches_tracked": np.zeros((), np.int64)}
    load_state(model, state_nbt)  # ignored
    bad = dict(state)
    del bad["linear.bias"]
    with pytest.raises(CheckpointError, match="linear.bias"):
        load_state(model, bad)
    bad = dict(state)
    bad["linear.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ShapeMismatchError, match="linear.weight"):
        load_state(model, bad)
    with pytest.raises(CheckpointError):
        load_state(model, reparameterize_state(spec, state))  # deploy keys into a train model
