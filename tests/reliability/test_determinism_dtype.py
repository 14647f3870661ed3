"""Determinism (same input -> byte-identical output in every format; the streaming path and the
whole-state --verify path write the same bytes) and the --dtype float16|bfloat16 option."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from parity_tests.backend_rule import require_module
from reparam_core import get_spec, random_state
from reparam_core.blocks import oracle
from reparam_core.blocks.fuse import reparameterize_state
from reparam_core.errors import CheckpointError
from reparam_core.formats import load_neutral, read_raw, safetensors_io
from reparam_core.formats.convert import convert, verify_input
from reparam_core.weights.precision import PrecisionWarning
from scripts import convert as cv

EXT = {"torch": "pth", "safetensors": "safetensors", "megengine": "pkl", "flax": "msgpack"}


@pytest.mark.parametrize("model", ["RepVGG-mini", "repghostnet_0_5x"])
@pytest.mark.parametrize("fmt", list(EXT))
@pytest.mark.parametrize("deploy", [False, True])
def test_byte_identical_outputs(tmp_path, model, fmt, deploy):
    spec = get_spec(model, 10)
    src = tmp_path / "src.safetensors"
    safetensors_io.save_file(random_state(spec, "train", seed=3), src)
    outs = []
    for i, verify in enumerate((False, False, True)):
        if verify and fmt in ("torch", "flax", "megengine"):
            verify = False  # the backends are tested elsewhere; the oracle path is enough here
        dst = tmp_path / f"o{i}.{EXT[fmt]}"
        rep = convert(src, dst, model, to_deploy=deploy, verify=verify)
        outs.append(dst.read_bytes())
        assert rep["bytes"] == len(outs[-1])
    assert outs[0] == outs[1] == outs[2]
    back, form, _, _ = load_neutral(str(tmp_path / f"o0.{EXT[fmt]}"), spec)
    expect = random_state(spec, "train", seed=3)
    if deploy:
        expect = reparameterize_state(spec, expect)
    assert form == ("deploy" if deploy else "train")
    assert all(np.array_equal(back[k], expect[k]) for k in expect)


def test_streaming_equals_verify_path_on_a_deep_model(tmp_path):
    spec = get_spec("RepVGG-A0", 10)
    src = tmp_path / "a0.safetensors"
    safetensors_io.save_file(random_state(spec, "train", seed=4), src)
    convert(src, tmp_path / "s.safetensors", "RepVGG-A0", to_deploy=True)
    convert(src, tmp_path / "v.safetensors", "RepVGG-A0", to_deploy=True, verify=True)
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "v.safetensors").read_bytes()


def test_torch_output_is_ours_and_loads_in_torch(tmp_path, pytestconfig):
    torch = require_module(pytestconfig, "torch")
    spec = get_spec("RepVGG-mini", 10)
    src = tmp_path / "src.safetensors"
    state = random_state(spec, "train", seed=5)
    safetensors_io.save_file(state, src)
    convert(src, tmp_path / "o.pth", "RepVGG-mini")
    loaded = torch.load(tmp_path / "o.pth", weights_only=True)
    assert list(loaded) == list(state)
    assert all(np.array_equal(loaded[k].numpy(), state[k]) for k in state)


@pytest.mark.parametrize("fmt", list(EXT))
def test_float16_output(tmp_path, fmt):
    spec = get_spec("RepVGG-mini", 10)
    train = random_state(spec, "train", seed=6)
    src = tmp_path / "src.safetensors"
    safetensors_io.save_file(train, src)
    dst = tmp_path / f"h.{EXT[fmt]}"
    rep = convert(src, dst, "RepVGG-mini", to_deploy=True, dtype="float16")
    assert rep["dtype"] == "float16" and not rep["precision"]["overflowed"]
    assert 0 < rep["precision"]["max_rel_err"] <= 2.0**-10
    again = tmp_path / f"h2.{EXT[fmt]}"
    convert(src, again, "RepVGG-mini", to_deploy=True, dtype="float16")
    assert dst.read_bytes() == again.read_bytes()
    raw, _ = read_raw(str(dst))
    assert all(v.dtype == np.float16 for v in raw.values())
    back, form, _, _ = load_neutral(str(dst), spec)
    x = verify_input(spec)
    ref = oracle.forward(spec, train, x, "train")
    out = oracle.forward(spec, back, x, "deploy")
    err = np.max(np.abs(ref - out)) / np.max(np.abs(ref))
    assert form == "deploy" and err <= 1e-2


def test_bfloat16_safetensors_and_refused_elsewhere(tmp_path):
    spec = get_spec("RepVGG-mini", 10)
    train = random_state(spec, "train", seed=7)
    src = tmp_path / "src.safetensors"
    safetensors_io.save_file(train, src)
    rep = convert(src, tmp_path / "b.safetensors", "RepVGG-mini", to_deploy=True, dtype="bfloat16", verify=True)
    assert rep["verify"]["max_rel_err"] <= rep["verify"]["tolerance"] == 5e-2
    assert 0 < rep["precision"]["max_rel_err"] <= 2.0**-7
    data = (tmp_path / "b.safetensors").read_bytes()
    assert b'"BF16"' in data
    with pytest.raises(CheckpointError, match="bfloat16 is only supported for safetensors"):
        convert(src, tmp_path / "b.pth", "RepVGG-mini", dtype="bfloat16")
    assert not (tmp_path / "b.pth").exists()


def test_float16_overflow_warns_and_reports(tmp_path, capsys):
    spec = get_spec("RepVGG-mini", 10)
    train = random_state(spec, "train", seed=8)
    train["stage1.0.rbr_dense.bn.running_var"] = np.full_like(train["stage1.0.rbr_dense.bn.running_var"], 1e-12)
    train["stage1.0.rbr_dense.bn.weight"] = np.full_like(train["stage1.0.rbr_dense.bn.weight"], 1e3)
    src = tmp_path / "src.safetensors"
    safetensors_io.save_file(train, src)
    with pytest.warns(PrecisionWarning, match="stage1.0.rbr_reparam"):
        rep = convert(src, tmp_path / "o.safetensors", "RepVGG-mini", to_deploy=True, dtype="float16")
    assert any(k.startswith("stage1.0.rbr_reparam") for k in rep["precision"]["overflowed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        rc = cv.main(
            [str(src), str(tmp_path / "o2.safetensors"), "--model", "RepVGG-mini", "--to-deploy", "--dtype", "float16"]
        )
    assert rc == 0 and "float16: max relative rounding error" in capsys.readouterr().out
