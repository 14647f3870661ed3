"""Spec-derived parameter counts equal the official figures; the registry and errors behave."""

from __future__ import annotations

import pytest

from reparam_core import (
    UnknownModelError,
    count_macs,
    count_params,
    count_params_folded,
    get_spec,
    list_models,
    state_schema,
)

# (name, form) -> official learnable parameters in millions (1000 classes), to 2 decimals
OFFICIAL = {
    ("RepVGG-A0", "deploy"): 8.31,
    ("RepVGG-A0", "train"): 9.11,
    ("RepVGG-B1g4", "deploy"): 36.13,
    ("RepVGG-B3", "deploy"): 110.96,
    ("RepVGG-D2se", "deploy"): 120.39,
    ("repghostnet_1_0x", "deploy"): 4.06,
    ("repghostnet_0_5x", "deploy"): 2.31,
    ("repghostnet_2_0x", "deploy"): 9.77,
}


@pytest.mark.parametrize("name,form", sorted(OFFICIAL))
def test_official_parameter_counts(name: str, form: str) -> None:
    assert round(count_params(get_spec(name), form) / 1e6, 2) == OFFICIAL[(name, form)]


def test_repghost_folded_counts_fewer() -> None:
    spec = get_spec("repghostnet_1_0x")
    assert count_params_folded(spec) < count_params(spec, "deploy")
    assert round(count_params_folded(spec) / 1e6, 2) == 4.05


def test_official_macs() -> None:
    # RepGhostNet's model names carry their MACs at 224: 1.0x is "142M", 0.5x "43M", 2.0x "516M"
    assert round(count_macs(get_spec("repghostnet_1_0x"), "deploy") / 1e6) == 142
    assert round(count_macs(get_spec("repghostnet_0_5x"), "deploy") / 1e6) == 43
    assert round(count_macs(get_spec("repghostnet_2_0x"), "deploy") / 1e6) == 516
    a0 = get_spec("RepVGG-A0")
    assert round(count_macs(a0, "deploy") / 1e9, 2) == 1.36  # official table: 1.4 G
    assert count_macs(a0, "train") > count_macs(a0, "deploy")


def test_registry_has_every_official_name() -> None:
    names = set(list_models())
    for n in ["A0", "A1", "A2", "B0", "B1", "B1g2", "B1g4", "B2", "B2g2", "B2g4", "B3", "B3g2", "B3g4", "D2se"]:
        assert f"RepVGG-{n}" in names
    assert "RepVGGplus-L2pse" in names
    for w in ["0_5x", "0_58x", "0_8x", "1_0x", "1_11x", "1_3x", "1_5x", "2_0x"]:
        assert f"repghostnet_{w}" in names


def test_grouped_layers_follow_official_map() -> None:
    spec = get_spec("RepVGG-B1g4")
    groups = [b.groups for _, b in spec.blocks()]
    assert groups[0] == 1 and groups[1] == 1 and groups[2] == 4 and groups[3] == 1
    assert [i for i, g in enumerate(groups) if g == 4] == list(range(2, 27, 2))


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError, match="did you mean.*RepVGG-A0"):
        get_spec("RepVGG-AO")


def test_schema_keys_are_official_names() -> None:
    train = state_schema(get_spec("RepVGG-A0"), "train")
    assert train["stage0.rbr_dense.conv.weight"].shape == (48, 3, 3, 3)
    assert "stage1.1.rbr_identity.running_var" in train
    assert "stage0.rbr_identity.weight" not in train  # 3 -> 48 channels: no identity
    assert train["linear.weight"].shape == (1000, 1280)
    deploy = state_schema(get_spec("RepVGG-A0"), "deploy")
    assert deploy["stage1.0.rbr_reparam.bias"].shape == (48,)
    d2se = state_schema(get_spec("RepVGG-D2se"), "train")
    assert d2se["stage1.1.se.down.weight"].shape == (10, 160, 1, 1)
    plus = state_schema(get_spec("RepVGGplus-L2pse"), "train")
    assert plus["stage1.blocks.0.post_se.down.weight"].shape == (40, 160, 1, 1)
    assert plus["stage3_first_aux.3.weight"].shape == (1000, 640)
    assert not any("aux" in k for k in state_schema(get_spec("RepVGGplus-L2pse"), "deploy"))
    ghost = state_schema(get_spec("repghostnet_1_0x"), "train")
    assert ghost["blocks.0.0.ghost1.primary_conv.0.weight"].shape == (8, 16, 1, 1)
    assert ghost["blocks.0.0.ghost1.fusion_bn.0.running_var"].shape == (8,)
    assert ghost["blocks.0.0.ghost1.cheap_operation.0.weight"].shape == (8, 1, 3, 3)
    assert ghost["conv_head.weight"].shape == (1280, 960, 1, 1)
    assert "blocks.0.0.ghost1.cheap_operation.bias" in state_schema(get_spec("repghostnet_1_0x"), "deploy")


@pytest.mark.parametrize(
    "alias,name",
    [
        ("repvgg_a0", "RepVGG-A0"),
        ("REPVGG-b1G4", "RepVGG-B1g4"),
        ("repvgg_d2se", "RepVGG-D2se"),
        ("repghostnet_100", "repghostnet_1_0x"),
        ("repghostnet_058", "repghostnet_0_58x"),
        ("RepGhostNet_0_5X", "repghostnet_0_5x"),
    ],
)
def test_aliases_and_case(alias, name):
    from reparam_core.families.specs import resolve_model_name

    assert resolve_model_name(alias) == name
    spec = get_spec(alias, 7)
    assert spec.name == name and spec == get_spec(name, 7)


def test_unknown_alias_suggests_registry_names():
    with pytest.raises(
        UnknownModelError,
        match=r"unknown model 'repvgg_a9'; did you mean "
        r"RepVGG-A\d, RepVGG-A\d, RepVGG-A\d\?",
    ):
        get_spec("repvgg_a9")
