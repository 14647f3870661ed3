"""MegEngine checkpoint files between the library and MegEngine itself, in both directions:

- a file the library writes (formats.encode, the writer behind `reparam convert --to-format
  megengine`) is read by `megengine.load`, holds MegEngine's native names, shapes and order, and
  loads through MegEngine's own `load_state_dict` (strict) into a model that then has the same
  tensors and outputs as one given the neutral state through backends.megengine.load_state;
- `megengine.save(model.state_dict(), path)` is read by the library (formats.load_neutral, the
  restricted unpickler; plain pickle.load/loads are made to fail meanwhile) as the neutral state
  the model was given: the same keys in schema order, shapes and values, exactly.

Models: a RepVGG with groups=4 (5-D grouped kernels; `(1, C, 1, 1)` conv biases in deploy form)
and repghostnet_0_5x (BN-only branches, SE), each in train and deploy form; BN tensors are flat
`(C,)` in MegEngine's state_dict and in both files.
"""

from __future__ import annotations

import pickle

import megengine as mge
import numpy as np
import pytest
from mge_testutil import rand_input

from backends.megengine import load_state, model_from_spec, predict
from reparam_core import get_spec, random_state, reparameterize_state, state_schema
from reparam_core.families.specs import repvgg_spec
from reparam_core.formats import encode, load_neutral, safetensors_io
from reparam_core.formats.convert import convert

# same structure as RepVGG-B1g4 (groups=4 on the official layers), small widths for speed
GROUPED = repvgg_spec("RepVGG-g4-small", (2, 2, 2, 1), (0.5, 0.5, 0.5, 0.5), groups=4, num_classes=10)
GHOST = get_spec("repghostnet_0_5x", 10)
CASES = [(spec, form) for spec in (GROUPED, GHOST) for form in ("train", "deploy")]
IDS = [f"{spec.name}-{form}" for spec, form in CASES]
X = rand_input((2, 3, 32, 32), seed=3)


def fresh(spec, form: str):
    return model_from_spec(spec, deploy=form == "deploy")


def native_state(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in model.state_dict().items()}


def assert_native_layout(state: dict, spec, form: str) -> None:
    """`state` has MegEngine's state_dict names and shapes for (spec, form): 5-D grouped kernels,
    `(1, C, 1, 1)` conv biases and flat BN tensors where the schema has them."""
    native = native_state(fresh(spec, form))
    assert {k: np.shape(v) for k, v in state.items()} == {k: v.shape for k, v in native.items()}
    schema = state_schema(spec, form)
    kinds = {kind: [k for k, i in schema.items() if i.kind == kind] for kind in ("bn.running_var", "conv.bias")}
    assert all(np.shape(state[k]) == schema[k].shape == (schema[k].shape[0],) for k in kinds["bn.running_var"])
    assert all(np.shape(state[k]) == (1, schema[k].shape[0], 1, 1) for k in kinds["conv.bias"])
    grouped = [k for k, i in schema.items() if i.kind == "conv.weight" and i.groups > 1]
    assert all(np.ndim(state[k]) == 5 and np.shape(state[k])[0] == schema[k].groups for k in grouped)
    # the case covers what it claims to: BN in train form, conv biases in deploy form, groups
    assert kinds["bn.running_var" if form == "train" else "conv.bias"] and (grouped or spec is GHOST)


def assert_same_model(model, expected) -> None:
    """The same native tensors and, on X, bit-identical outputs."""
    got, want = native_state(model), native_state(expected)
    assert list(got) == list(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    np.testing.assert_array_equal(predict(model, X), predict(expected, X))


@pytest.mark.parametrize("spec, form", CASES, ids=IDS)
def test_library_file_is_read_by_megengine(tmp_path, spec, form) -> None:
    state = random_state(spec, form, seed=11)
    path = tmp_path / "library.pkl"
    path.write_bytes(encode(spec, state, form, "megengine"))

    loaded = mge.load(str(path))
    assert list(loaded) == list(state_schema(spec, form))  # schema order
    assert_native_layout(loaded, spec, form)
    model = fresh(spec, form)
    model.load_state_dict(loaded, strict=True)
    assert_same_model(model, load_state(fresh(spec, form), state))


@pytest.mark.parametrize("spec, form", CASES, ids=IDS)
def test_megengine_save_is_read_by_the_library(tmp_path, monkeypatch, spec, form) -> None:
    state = random_state(spec, form, seed=12)
    model = load_state(fresh(spec, form), state)
    path = tmp_path / "saved.pkl"
    mge.save(model.state_dict(), str(path))
    assert_native_layout(mge.load(str(path)), spec, form)

    def unrestricted(*args, **kwargs):
        raise AssertionError("the library read a checkpoint with plain pickle")

    monkeypatch.setattr(pickle, "load", unrestricted)
    monkeypatch.setattr(pickle, "loads", unrestricted)
    back, found, fmt, scheme = load_neutral(path, spec)
    monkeypatch.undo()

    assert (found, fmt, scheme) == (form, "megengine", "canonical")
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == np.float32 and back[k].shape == v.shape and np.array_equal(back[k], v), k


def test_converted_deploy_file_is_read_by_megengine(tmp_path) -> None:
    """`reparam convert --to-deploy --to-format megengine` of a registry model: MegEngine loads
    the file into a deploy model that is the one the core's fused state gives."""
    spec = GHOST
    state = random_state(spec, "train", seed=13)
    src, dst = tmp_path / "train.safetensors", tmp_path / "deploy.pkl"
    safetensors_io.save_file(state, src)
    report = convert(src, dst, spec.name, to_deploy=True, to_format="megengine")
    assert (report["from_form"], report["to_form"], report["to_format"]) == ("train", "deploy", "megengine")

    model = fresh(spec, "deploy")
    model.load_state_dict(mge.load(str(dst)), strict=True)
    assert_same_model(model, load_state(fresh(spec, "deploy"), reparameterize_state(spec, state)))
