"""Descriptions as JSON data and back (reparam_core.blocks.nodes_io): every registry model and every
node type survives json.dumps/loads unchanged; bad data names the node at fault."""

from __future__ import annotations

import json

import pytest

from reparam_core import (
    BN,
    SE,
    Act,
    AvgPool,
    Block,
    Conv,
    FusionError,
    PadBN,
    Rep,
    Scale,
    SpecError,
    block_spec_from_dict,
    block_spec_to_dict,
    describe,
    get_spec,
    list_models,
    to_deploy,
)
from reparam_core.blocks.nodes_io import description_from_data, description_to_data

EVERY_PRIMITIVE = Block(
    "",
    "AllPrimitives",
    (
        Rep(
            (
                (Conv("a.conv", 4, 4, (3, 3), padding=1), BN("a.bn", 4, 1e-3)),
                (Conv("b.conv", 4, 6, 1), PadBN("b.pad", 6, 1), Conv("b.conv2", 6, 4, (3, 3))),
                (Conv("c.conv", 4, 4, 1), PadBN("c.pad", 4, 1), AvgPool(3), BN("c.bn", 4)),
                (Conv("e.conv", 4, 4, (1, 3), padding=(0, 1)),),
                (Scale("d", 4),),
                (),
            ),
            Conv("fused", 4, 4, 3, padding=1),
            bn=BN("post", 4),
        ),
        SE("se", 4, 2, "reduce", "expand", "hard_sigmoid"),
        Act("silu"),
    ),
)


def _round_trip(desc):
    return description_from_data(json.loads(json.dumps(description_to_data(desc))))


@pytest.mark.parametrize("model", list_models())
def test_every_model_round_trips(model):
    desc = describe(get_spec(model, 10))
    assert _round_trip(desc) == desc
    assert _round_trip(to_deploy(desc)) == to_deploy(desc)


def test_every_primitive_round_trips_and_crosses_as_a_block_request():
    assert _round_trip(EVERY_PRIMITIVE) == EVERY_PRIMITIVE
    data = json.loads(json.dumps(block_spec_to_dict(EVERY_PRIMITIVE)))
    assert data["kind"] == "description"
    assert block_spec_from_dict(data) == EVERY_PRIMITIVE


def test_registered_block_specs_keep_their_fields():
    spec = get_spec("RepVGG-A0").stem
    data = block_spec_to_dict(spec)
    assert data["kind"] == "repblock" and data["in_channels"] == 3
    assert block_spec_from_dict(data) == spec


def test_bad_data_names_the_node():
    data = description_to_data(EVERY_PRIMITIVE)
    data["body"][0]["branches"][0][0]["node"] = "Conv3d"
    with pytest.raises(SpecError, match=r"unknown description node 'Conv3d'; expected one of Conv"):
        description_from_data(data)
    data = description_to_data(EVERY_PRIMITIVE)
    data["body"][1]["gates"] = "x"
    with pytest.raises(SpecError, match=r"bad SE node: .*gates"):
        description_from_data(data)
    with pytest.raises(SpecError, match="model description"):
        block_spec_from_dict(
            {"kind": "description", "description": description_to_data(describe(get_spec("RepVGG-mini")))}
        )


def test_a_rep_read_back_is_checked_again():
    data = description_to_data(EVERY_PRIMITIVE)
    data["body"][0]["branches"][0][0]["stride"] = [2, 2]  # one branch strided: not one conv
    with pytest.raises(FusionError):
        description_from_data(data)
