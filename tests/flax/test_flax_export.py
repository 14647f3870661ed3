"""Deployment artifacts: jax.export (StableHLO) round trip and file layout, nnx.jit of the deploy
model, safetensors of native_state and an orbax checkpoint of the NNX state."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from flax_testutil import BLOCK_RTOL, loaded_model, model_input, model_state, rel_err

import backends.flax as bf
from reparam_core import CheckpointError, RepGhostBottleneckSpec, get_spec, state_schema
from reparam_core.formats import safetensors_io
from reparam_core.weights.layouts import flax_key

NAME = "RepVGG-mini"


@pytest.fixture(scope="module")
def trained_pair():
    model = loaded_model(NAME, model_state(NAME, seed=3))
    return model, bf.reparameterize(model)


def test_stablehlo_export_round_trip(tmp_path, trained_pair) -> None:
    model, deploy = trained_pair
    x = model_input(NAME, batch=2, seed=4)
    path = bf.export_stablehlo(model, tmp_path / "mini.stablehlo", (2, 3, 32, 32))
    assert not model.deploy  # the train-form input is untouched
    fn = bf.load_stablehlo(path)
    y = fn(x)
    assert y.shape == (2, 1000)
    assert rel_err(y, bf.predict(deploy, x)) <= 1e-5
    # the artifact holds one conv per block: no batch-norm arithmetic on the branches
    text = fn.exported.mlir_module()
    assert text.count("stablehlo.convolution") == len(get_spec(NAME).blocks())


def test_stablehlo_artifact_holds_the_weights_as_arguments(tmp_path, trained_pair) -> None:
    """The fused weights are tensors of the file and arguments of the module, not constants
    (issue 28: constants existed as MLIR, bytes and compiled copies at once)."""
    _, deploy = trained_pair
    path = bf.export_stablehlo(deploy, tmp_path / "mini.stablehlo", (1, 3, 32, 32))
    tensors, meta = safetensors_io.load_file(path)
    names = json.loads(meta["weights"])
    native = bf.export_state(deploy)
    assert len(names) == len(native) and sorted(tensors) == sorted([*names, "module"])
    assert sum(tensors[n].size for n in names) == sum(v.size for v in native.values())
    fn = bf.load_stablehlo(path)
    assert len(fn.exported.in_avals) == len(names) + 1
    assert tensors["module"].size < 100_000  # the program only: no weight in it


def test_stablehlo_export_of_a_model_with_a_dropout_key(tmp_path) -> None:
    """RepGhostNet's head keeps a dropout key (not a weight): it stays in the module."""
    model = bf.create_model("repghostnet_0_5x", num_classes=10)
    assert nnx.state(model, nnx.RngState)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    fn = bf.load_stablehlo(bf.export_stablehlo(model, tmp_path / "ghost.stablehlo", x.shape))
    assert rel_err(fn(x), bf.predict(bf.reparameterize(model), x)) <= 1e-5


def test_load_stablehlo_refuses_other_files(tmp_path) -> None:
    path = tmp_path / "state.safetensors"
    safetensors_io.save_file({"w": np.ones(2, np.float32)}, path)
    with pytest.raises(CheckpointError, match="not a StableHLO artifact"):
        bf.load_stablehlo(path)


def test_stablehlo_export_of_a_block(tmp_path) -> None:
    spec = RepGhostBottleneckSpec(8, 24, 16, 3, 2, se_channels=8)
    from flax_testutil import random_params

    from backends.flax.state import module_schema

    block = bf.empty_block(spec)
    bf.load_state(block, random_params(module_schema(block), 5))
    x = np.random.default_rng(0).standard_normal((1, 8, 15, 15)).astype(np.float32)
    fn = bf.load_stablehlo(bf.export_stablehlo(block, tmp_path / "b.bin", x.shape))
    y = fn(x)
    assert y.shape == (1, 16, 8, 8)
    assert rel_err(y, bf.predict(block, x)) <= BLOCK_RTOL


def test_deploy_model_runs_under_nnx_jit(trained_pair) -> None:
    _, deploy = trained_pair
    x = model_input(NAME, batch=2, seed=6)
    view = bf.inference_view(deploy)
    y = nnx.jit(lambda m, v: m(v))(view, x.transpose(0, 2, 3, 1))
    assert rel_err(np.asarray(y), bf.predict(deploy, x)) <= 1e-6


def test_safetensors_round_trip_of_native_state(tmp_path, trained_pair) -> None:
    _, deploy = trained_pair
    native = bf.native_state(deploy)
    schema = state_schema(get_spec(NAME), "deploy")
    assert list(native) == [flax_key(k, info) for k, info in schema.items()]
    path = tmp_path / "mini_deploy.safetensors"
    safetensors_io.save_file(native, path, metadata={"model": NAME, "layout": "flax"})
    loaded, meta = safetensors_io.load_file(path)
    assert meta["layout"] == "flax"
    restored = bf.load_native_state(bf.empty_model(NAME, deploy=True), loaded)
    for k, v in bf.export_state(deploy).items():
        np.testing.assert_array_equal(bf.export_state(restored)[k], v, err_msg=k)
    x = model_input(NAME, seed=8)
    np.testing.assert_array_equal(bf.predict(restored, x), bf.predict(deploy, x))


def test_orbax_round_trip(tmp_path, trained_pair) -> None:
    import orbax.checkpoint as ocp  # works offline: a local directory checkpoint

    _, deploy = trained_pair
    state = nnx.state(deploy)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", state)
        ckptr.wait_until_finished()
        target = bf.empty_model(NAME, deploy=True)
        abstract = nnx.state(target)
        restored_state = ckptr.restore(tmp_path / "ckpt", abstract)
    nnx.update(target, restored_state)
    for k, v in bf.export_state(deploy).items():
        np.testing.assert_array_equal(bf.export_state(target)[k], v, err_msg=k)
    x = model_input(NAME, seed=9)
    np.testing.assert_array_equal(bf.predict(target, x), bf.predict(deploy, x))
