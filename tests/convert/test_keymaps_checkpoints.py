"""Key schemes (timm / mmpretrain / basecls -> canonical) and the framework-free readers/writers."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest

from reparam_core import get_spec, list_models, random_state, state_schema
from reparam_core.errors import CheckpointError, SpecError
from reparam_core.formats import detect_format, read_raw, safetensors_io, to_neutral
from reparam_core.formats.megengine_pickle import megengine_bytes
from reparam_core.formats.torch_zip import torch_zip_bytes
from reparam_core.weights.keymaps import SCHEMES, apply_scheme, from_canonical, map_key, schemes_for, to_canonical


# Foreign names written out by hand from the upstream sources (independent of keymaps.SCHEMES).
def timm_name(key: str) -> str:
    key = re.sub(r"^stage0\.", "stem.", key)
    key = re.sub(r"^stage(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", key)
    key = key.replace("rbr_dense.", "conv_kxk.").replace("rbr_1x1.", "conv_1x1.")
    key = key.replace("rbr_identity.", "identity.").replace("rbr_reparam.", "reparam_conv.")
    key = key.replace("se.down.", "attn.fc1.").replace("se.up.", "attn.fc2.")
    return re.sub(r"^linear\.", "head.fc.", key)


def mmpretrain_name(key: str) -> str:
    key = re.sub(r"^stage0\.", "backbone.stem.", key)
    key = re.sub(r"^stage(\d)\.", r"backbone.stage_\1.", key)
    key = key.replace("rbr_dense.conv.", "branch_3x3.conv.").replace("rbr_dense.bn.", "branch_3x3.norm.")
    key = key.replace("rbr_1x1.conv.", "branch_1x1.conv.").replace("rbr_1x1.bn.", "branch_1x1.norm.")
    key = key.replace("rbr_identity.", "branch_norm.").replace("rbr_reparam.", "branch_reparam.")
    key = key.replace("se.down.", "se_layer.conv1.conv.").replace("se.up.", "se_layer.conv2.conv.")
    return re.sub(r"^linear\.", "head.fc.", key)


def basecls_name(key: str) -> str:
    key = key.replace("se.down.", "se.f_ex.0.").replace("se.up.", "se.f_ex.2.")
    return re.sub(r"^linear\.", "head.fc.", key)


@pytest.mark.parametrize(
    "scheme,rename", [("timm", timm_name), ("mmpretrain", mmpretrain_name), ("basecls", basecls_name)]
)
@pytest.mark.parametrize("model", ["RepVGG-A0", "RepVGG-B1g4", "RepVGG-D2se"])
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_foreign_schemes_map_to_canonical(scheme, rename, model, form):
    spec = get_spec(model)
    keys = list(state_schema(spec, form))
    foreign = {rename(k): np.empty(0) for k in keys}
    if scheme != "mmpretrain":
        foreign.update(
            {
                rename(k).replace("running_var", "num_batches_tracked"): np.empty(0)
                for k in keys
                if k.endswith("running_var")
            }
        )
    assert set(foreign) != set(keys)
    mapped, name = to_canonical(foreign, spec)
    assert name == scheme
    assert {k for k in mapped if not k.endswith("num_batches_tracked")} == set(keys)


def test_canonical_scheme_preferred(mini_spec, mini_train):
    mapped, name = to_canonical(mini_train, mini_spec)
    assert name == "canonical" and mapped.keys() == mini_train.keys()


def test_nothing_maps(mini_spec):
    with pytest.raises(
        CheckpointError,
        match=r"no key maps onto RepVGG-mini.*first unmapped keys: "
        r"encoder\.layer0\.weight",
    ):
        to_canonical({"encoder.layer0.weight": np.zeros(3), "decoder.w": np.zeros(1)}, mini_spec)


def test_timm_checkpoint_to_neutral(tmp_path, mini_spec, mini_train):
    path = tmp_path / "timm.safetensors"
    safetensors_io.save_file({timm_name(k): v for k, v in mini_train.items()}, path)
    raw, fmt = read_raw(path)
    state, form, scheme = to_neutral(raw, mini_spec, fmt)
    assert (form, scheme) == ("train", "timm")
    assert all(np.array_equal(state[k], mini_train[k]) for k in mini_train)


@pytest.mark.parametrize("model", ["RepVGG-B1g4", "repghostnet_0_5x"])
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_megengine_pickle_shapes_and_round_trip(tmp_path, model, form):
    spec = get_spec(model, num_classes=10)
    state = random_state(spec, form, seed=3)
    path = tmp_path / "m.pkl"
    path.write_bytes(megengine_bytes(spec, state, form))
    raw = pickle.loads(path.read_bytes())  # a plain dict of numpy arrays, MegEngine shapes
    assert list(raw) == list(state_schema(spec, form))
    for k, info in state_schema(spec, form).items():
        if info.kind == "conv.weight" and info.groups > 1:
            assert raw[k].ndim == 5 and raw[k].shape[0] == info.groups, k
        if info.kind == "conv.bias":
            assert raw[k].shape == (1, info.shape[0], 1, 1), k
    assert detect_format(path) == "megengine"
    got, fmt = read_raw(path)
    back, found, _ = to_neutral(got, spec, fmt)
    assert found == form
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_megengine_pickle_deterministic(mini_spec, mini_train):
    assert megengine_bytes(mini_spec, mini_train, "train") == megengine_bytes(
        mini_spec, dict(reversed(list(mini_train.items()))), "train"
    )


def test_torch_zip_without_torch_and_wrappers(tmp_path, mini_spec, mini_train):
    path = tmp_path / "m.pth"
    path.write_bytes(torch_zip_bytes({"module." + k: v for k, v in mini_train.items()}))
    assert detect_format(path) == "torch"
    raw, fmt = read_raw(path)
    assert set(raw) == set(mini_train)  # DDP prefix stripped
    wrapped = tmp_path / "w.pkl"
    wrapped.write_bytes(
        pickle.dumps(
            {"epoch": 3, "optimizer": {"lr": 0.1}, "state_dict": {"module." + k: v for k, v in mini_train.items()}}
        )
    )
    raw2, _ = read_raw(wrapped)
    assert set(raw2) == set(mini_train)


def test_legacy_torch_refused(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001))
    assert detect_format(path) == "torch-legacy"
    with pytest.raises(CheckpointError, match="legacy"):
        read_raw(path)
    with pytest.raises(CheckpointError, match="legacy"):
        read_raw(path, "torch")


@pytest.mark.parametrize("fmt", ["torch", "megengine", "safetensors"])
def test_truncated_files(tmp_path, mini_spec, mini_train, fmt):
    data = {
        "torch": torch_zip_bytes(mini_train),
        "megengine": megengine_bytes(mini_spec, mini_train, "train"),
        "safetensors": safetensors_io.dumps(mini_train),
    }[fmt]
    path = tmp_path / "cut.bin"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt|truncated|not a valid|does not fit|missing"):
        raw, f = read_raw(path, fmt)
        to_neutral(raw, mini_spec, f)


def test_detect_unknown(tmp_path):
    path = tmp_path / "weights.xyz"
    path.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot tell the format"):
        detect_format(path)


@pytest.mark.parametrize(
    "scheme,rename", [("timm", timm_name), ("mmpretrain", mmpretrain_name), ("basecls", basecls_name)]
)
@pytest.mark.parametrize("model", ["RepVGG-A0", "RepVGG-B1g4", "RepVGG-D2se"])
def test_from_canonical_writes_foreign_names(scheme, rename, model):
    """canonical -> foreign gives the hand-written foreign names (the map's other direction)."""
    spec = get_spec(model)
    for form in ("train", "deploy"):
        keys = {k: np.empty(0) for k in state_schema(spec, form)}
        assert list(from_canonical(keys, spec, scheme)) == [rename(k) for k in keys]


@pytest.mark.parametrize("model", list_models())
def test_every_scheme_round_trips(model):
    """For every registry model, form and scheme of its family: canonical -> foreign ->
    canonical is the identity, foreign names are distinct, and the scheme is detected back."""
    spec = get_spec(model)
    for form in ("train", "deploy"):
        keys = {k: np.empty(0) for k in state_schema(spec, form)}
        for scheme in schemes_for(spec):
            foreign = from_canonical(keys, spec, scheme)
            assert len(foreign) == len(keys)
            back, found = to_canonical(foreign, spec)
            assert list(back) == list(keys)
            if scheme != "canonical" and set(foreign) != set(keys):
                assert found == scheme or set(apply_scheme(foreign, schemes_for(spec)[found])) == set(keys)


def test_family_schemes_are_the_ecosystems():
    """Every family's schemes are among SCHEMES, `canonical` first; RepGhostNet's timm scheme is
    the identity (timm uses the official names), MobileOne has no basecls scheme."""
    for model in list_models():
        assert set(schemes_for(get_spec(model))) <= set(SCHEMES)
        assert next(iter(schemes_for(get_spec(model)))) == "canonical"
    assert schemes_for(get_spec("repghostnet_1_0x")) == {"canonical": [], "timm": []}
    assert list(schemes_for(get_spec("MobileOne-S0"))) == ["canonical", "mmpretrain", "timm"]
    with pytest.raises(SpecError, match=r"basecls does not implement this model's family\); known: canonical, mmp"):
        from_canonical({}, get_spec("MobileOne-S0"), "basecls")


def test_unknown_scheme_is_an_error(mini_spec):
    with pytest.raises(
        SpecError,
        match=r"RepVGG-mini has no 'onnx' naming scheme; known: "
        r"canonical, basecls, mmpretrain, timm",
    ):
        from_canonical({}, mini_spec, "onnx")


def test_affine_placeholders_both_ways():
    rules = [("^blocks.{j}.dw.", "^stage.{j*2}."), ("^blocks.{j}.pw.", "^stage.{j*2+1}.")]
    assert map_key("blocks.3.dw.w", rules) == "stage.6.w"
    assert map_key("blocks.3.pw.w", rules) == "stage.7.w"
    assert map_key("stage.7.w", rules, reverse=True) == "blocks.3.pw.w"
    assert map_key("xblocks.3.dw.w", rules) == "xblocks.3.dw.w"  # anchored at the start
    with pytest.raises(SpecError, match=r"bad placeholder \{j\*\*2\}"):
        map_key("a", [("{j**2}.", "b.")])
