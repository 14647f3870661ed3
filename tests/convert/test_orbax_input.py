"""Orbax checkpoint directories as `reparam convert` input: read by the Flax backend
(`backends.flax.orbax_io`, orbax needs JAX), handed to the framework-free core as Flax keys."""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import backends.flax as bf
from backends.flax.orbax_io import read_orbax
from reparam_core import ReparamError
from reparam_core.errors import BackendUnavailableError
from reparam_core.formats import read_raw, safetensors_io, to_neutral
from scripts import cli


@pytest.fixture()
def orbax_dir(tmp_path, mini_spec, mini_train):
    """An orbax directory of a RepVGG-mini train-form NNX state (as a plain pytree)."""
    model = bf.empty_model(mini_spec.name, num_classes=mini_spec.num_classes)
    bf.load_state(model, mini_train)
    path = tmp_path / "ckpt"
    ocp.PyTreeCheckpointer().save(path, nnx.to_pure_dict(nnx.state(model)))
    return path


def test_orbax_directory_reads_as_the_state_it_holds(orbax_dir, mini_spec, mini_train) -> None:
    raw, fmt = read_raw(orbax_dir, read_orbax=read_orbax)
    assert fmt == "flax"
    state, form, scheme = to_neutral(raw, mini_spec, fmt, source=str(orbax_dir))
    assert (form, scheme) == ("train", "canonical")
    assert state.keys() == mini_train.keys()
    for k, v in mini_train.items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)


def test_the_core_alone_names_the_reader_it_needs(orbax_dir) -> None:
    with pytest.raises(BackendUnavailableError, match="orbax_io.read_orbax"):
        read_raw(orbax_dir)


def test_not_an_orbax_directory(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReparamError, match="not a readable orbax checkpoint"):
        read_orbax(str(tmp_path / "empty"))


def test_reparam_convert_takes_an_orbax_directory(orbax_dir, tmp_path, mini_train) -> None:
    dst = tmp_path / "out.safetensors"
    rc = cli.main(["convert", str(orbax_dir), str(dst), "--model", "RepVGG-mini", "--from-format", "orbax", "-q"])
    assert rc == 0
    written, _ = safetensors_io.load_file(dst)
    for k, v in mini_train.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
