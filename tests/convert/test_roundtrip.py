"""torch -> megengine -> flax -> safetensors -> torch is bit-exact (train form); deploy conversion
matches the float64 oracle. Needs msgpack for the flax leg (the .venv environment); torch is used
for the .pth legs when installed (otherwise the framework-free torch zip writer)."""

from __future__ import annotations

import numpy as np
import pytest

from reparam_core import get_spec, random_state
from reparam_core.blocks import oracle
from reparam_core.formats import encode, load_neutral
from reparam_core.formats.convert import convert, verify_input

CHAIN = [("m.pkl", "megengine"), ("m.msgpack", "flax"), ("m.safetensors", "safetensors"), ("back.pth", "torch")]


@pytest.mark.parametrize("model", ["RepVGG-A0", "RepVGG-B1g4", "RepVGG-D2se", "repghostnet_1_0x"])
def test_chain_bit_exact(tmp_path, model):
    import msgpack  # noqa: F401

    spec = get_spec(model, num_classes=10)
    state = random_state(spec, "train", seed=5)
    src = tmp_path / "m.pth"
    src.write_bytes(encode(spec, state, "train", "torch"))
    for name, fmt in CHAIN:
        report = convert(src, tmp_path / name, model)
        assert (report["from_form"], report["to_form"], report["to_format"]) == ("train", "train", fmt)
        prev, src = src, tmp_path / name
        prev.unlink()  # keep the disk footprint to two copies
    back, form, fmt, scheme = load_neutral(str(src), spec)
    assert (form, fmt, scheme) == ("train", "torch", "canonical")
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], state[k]), k


@pytest.mark.parametrize("model", ["RepVGG-A0", "repghostnet_1_0x"])
@pytest.mark.parametrize("fmt", ["megengine", "flax", "torch", "safetensors"])
def test_deploy_matches_oracle(tmp_path, model, fmt):
    spec = get_spec(model, num_classes=10)
    state = random_state(spec, "train", seed=6)
    src = tmp_path / "t.safetensors"
    src.write_bytes(encode(spec, state, "train", "safetensors"))
    dst = tmp_path / f"d.{ {'megengine': 'pkl', 'flax': 'msgpack', 'torch': 'pth', 'safetensors': 'st'}[fmt] }"
    report = convert(src, dst, model, to_deploy=True, to_format=fmt)
    assert report["to_form"] == "deploy" and report["num_classes"] == 10
    deployed, form, _, _ = load_neutral(str(dst), spec, fmt)
    assert form == "deploy"
    x = verify_input(spec)
    ref = oracle.forward(spec, state, x, "train")
    out = oracle.forward(spec, deployed, x, "deploy")
    # both in float64: the only difference is the written deploy state's float32 rounding
    # (measured 5.1e-8 for RepVGG-A0, 2.6e-8 for repghostnet_1_0x, the same in every format)
    assert np.max(np.abs(ref - out)) <= 5e-7 * np.max(np.abs(ref))
