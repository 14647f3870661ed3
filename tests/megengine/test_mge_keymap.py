"""basecls-named checkpoints (megvii-research/basecls RepVGG) load through the key map."""

from __future__ import annotations

import re

import numpy as np
from mge_testutil import model_tolerance, rand_input, rel_err

from backends.megengine import RepVGG, create_model, export_state, load_state, predict
from reparam_core import RepVGGSpec, get_spec, random_state, state_schema
from reparam_core.blocks import oracle
from reparam_core.families.repvgg import KEYMAPS
from reparam_core.weights.keymaps import apply_scheme
from reparam_core.weights.layouts import to_megengine


# canonical -> basecls, written out by hand (independent of KEYMAPS), to build checkpoints
def to_basecls(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        k = re.sub(r"^linear\.", "head.fc.", k)
        out[k.replace(".se.down.", ".se.f_ex.0.").replace(".se.up.", ".se.f_ex.2.")] = v
    return out


def test_key_translation_tables():
    keys = {
        "head.fc.weight": 1,
        "stage1.0.se.f_ex.0.bias": 2,
        "stage1.0.se.f_ex.2.weight": 3,
        "stage1.0.rbr_dense.conv.weight": 4,
    }
    canonical = apply_scheme(keys, KEYMAPS["basecls"])
    assert canonical == {
        "linear.weight": 1,
        "stage1.0.se.down.bias": 2,
        "stage1.0.se.up.weight": 3,
        "stage1.0.rbr_dense.conv.weight": 4,
    }
    assert to_basecls(canonical) == keys
    assert apply_scheme(canonical, KEYMAPS["basecls"], reverse=True) == keys


def _as_basecls_checkpoint(spec: RepVGGSpec, state: dict) -> dict:
    """A basecls-style checkpoint: basecls names, MegEngine shapes (5-D grouped kernels,
    (1, C, 1, 1) conv biases, (1, C, 1, 1) BN tensors as basecls' raw parameters are)."""
    schema = state_schema(spec, "train")
    out = {}
    for k, info in schema.items():
        a = to_megengine(state[k], info)
        if info.kind.startswith("bn."):
            a = a.reshape(1, -1, 1, 1)
        out[k] = a
    return to_basecls(out)


def test_load_basecls_checkpoint_se_model_and_grouped():
    spec = get_spec("RepVGG-D2se", 10)
    small = RepVGGSpec("D2se-small", spec.stem, tuple(type(st)(st.name, st.blocks[:2]) for st in spec.stages[:2]), 10)
    # a small same-structure SE model (D2se itself is large), plus a grouped model
    for sp in (small, get_spec("RepVGG-B1g2", 10)):
        state = random_state(sp, "train", seed=4)
        ckpt = _as_basecls_checkpoint(sp, state)
        assert any(k.startswith("head.fc.") for k in ckpt)
        if sp is small:
            assert any(".se.f_ex.0." in k for k in ckpt) and any(".se.f_ex.2." in k for k in ckpt)
        else:
            assert any(v.ndim == 5 for v in ckpt.values())
        model = RepVGG(sp) if sp is small else create_model("RepVGG-B1g2", num_classes=10)
        load_state(model, ckpt)
        back = export_state(model)
        assert all(np.array_equal(back[k], state[k]) for k in state)
        if sp is small:
            x = rand_input((1, 3, 32, 32))
            assert rel_err(predict(model, x), oracle.forward(sp, state, x, "train")) <= model_tolerance(sp)
