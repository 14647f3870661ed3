"""QARepVGG models (cxxgtxy/QARepVGG create_QARepVGGBlockV2_A0/B0) as data: layout against the
official constructor's widths, depths and strides written out by hand, key names in both forms,
the official registry names as aliases, and the deploy form being exactly RepVGG's."""

from __future__ import annotations

import numpy as np
import pytest

from reparam_core import count_params, get_spec, list_models, random_state, reparameterize_state, schema_for
from reparam_core.blocks.oracle import forward
from reparam_core.families.specs import resolve_model_name

# (in, out, stride) of every block in forward order: stem 3 -> min(64, 64 w0) stride 2, then
# stages of 64 w0, 128 w1, 256 w2, 512 w3 channels, the first block of each with stride 2.
A0 = (
    [(3, 48, 2)]
    + [(48, 48, 2), (48, 48, 1)]
    + [(48, 96, 2)]
    + [(96, 96, 1)] * 3
    + [(96, 192, 2)]
    + [(192, 192, 1)] * 13
    + [(192, 1280, 2)]
)
B0 = (
    [(3, 64, 2)]
    + [(64, 64, 2)]
    + [(64, 64, 1)] * 3
    + [(64, 128, 2)]
    + [(128, 128, 1)] * 5
    + [(128, 256, 2)]
    + [(256, 256, 1)] * 15
    + [(256, 1280, 2)]
)


@pytest.mark.parametrize("name,layout", [("QARepVGG-A0", A0), ("QARepVGG-B0", B0)])
def test_layout_matches_the_official_constructor(name: str, layout: list) -> None:
    spec = get_spec(name, num_classes=10)
    blocks = spec.blocks()
    assert [(b.in_channels, b.out_channels, b.stride) for _, b in blocks] == layout
    assert all(b.groups == 1 and b.kind == "QARepVGGBlockV2" for _, b in blocks)
    assert [p for p, _ in blocks][:3] == ["stage0", "stage1.0", "stage1.1"]
    train, deploy = schema_for(spec, "train"), schema_for(spec, "deploy")
    assert train["linear.weight"].shape == deploy["linear.weight"].shape == (10, 1280)
    assert train["stage0.rbr_dense.conv.weight"].shape == (layout[0][1], 3, 3, 3)
    assert train["stage0.rbr_1x1.weight"].shape == (layout[0][1], 3, 1, 1)
    per_block = {"rbr_dense.conv.weight", "rbr_1x1.weight"} | {
        f"{m}.{f}" for m in ("rbr_dense.bn", "bn") for f in ("weight", "bias", "running_mean", "running_var")
    }
    assert set(train) == {f"{p}.{k}" for p, _ in blocks for k in per_block} | {"linear.weight", "linear.bias"}
    assert set(deploy) == {f"{p}.rbr_reparam.{f}" for p, _ in blocks for f in ("weight", "bias")} | {
        "linear.weight",
        "linear.bias",
    }


@pytest.mark.parametrize("qa,plain", [("QARepVGG-A0", "RepVGG-A0"), ("QARepVGG-B0", "RepVGG-B0")])
def test_deploy_form_is_repvggs(qa: str, plain: str) -> None:
    a, b = schema_for(get_spec(qa), "deploy"), schema_for(get_spec(plain), "deploy")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert count_params(get_spec(qa), "deploy") == count_params(get_spec(plain), "deploy")


def test_official_registry_names_are_aliases() -> None:
    assert {"QARepVGG-A0", "QARepVGG-B0"} <= set(list_models())
    assert resolve_model_name("QARepVGGV2-A0") == "QARepVGG-A0"
    assert resolve_model_name("qarepvggv2-b0") == "QARepVGG-B0"
    assert resolve_model_name("qarepvgg-a0") == "QARepVGG-A0"
    assert get_spec("QARepVGGV2-A0", 7).num_classes == 7


def test_a0_fused_state_matches_the_oracle() -> None:
    spec = get_spec("QARepVGG-A0", num_classes=10)
    state = random_state(spec, "train", seed=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y = forward(spec, state, x, "train")
    yd = forward(spec, reparameterize_state(spec, state), x, "deploy")
    # both in float64: the only difference is the fused state's float32 rounding (measured 6.6e-8)
    assert np.abs(yd - y).max() <= 7e-7 * np.abs(y).max()
