"""Every node type of the block description, including those no current family uses (PadBN,
AvgPool, Scale, non-square kernels, concatenation, a BN after the sum, every activation and
gate), built by the generic RepModule for kinds no class was written for: native names ==
schema, train and deploy forward vs the float64 oracle, auxiliary heads, a traced artifact."""

from __future__ import annotations

import megengine as mge
import numpy as np
import pytest
from mge_testutil import BLOCK_RTOL, model_tolerance, rand_input, rel_err

from backends.megengine import (
    RepModule,
    RepVGGBlock,
    block_class,
    build_block,
    export_state,
    export_traced,
    load_state,
    model_from_spec,
    predict,
    reparameterize,
    run_traced,
)
from reparam_core import (
    BN,
    SE,
    Act,
    Add,
    Aux,
    AvgPool,
    Block,
    Conv,
    Dropout,
    Flatten,
    GlobalPool,
    Linear,
    Model,
    PadBN,
    Rep,
    ReparamError,
    Scale,
    block_schema,
    random_state,
    reparameterize_state,
    schema_for,
)
from reparam_core.blocks import oracle
from reparam_core.weights.layouts import to_megengine

C = 8


def acnet(name: str = "") -> Block:
    """3x3 + 1x3 + 3x1 (non-square kernels), each with a BN."""
    return Block(
        name,
        "ACNetTestBlock",
        (
            Rep(
                (
                    (Conv("square.conv", C, C, 3, padding=1), BN("square.bn", C)),
                    (Conv("hor.conv", C, C, (1, 3), padding=(0, 1)), BN("hor.bn", C)),
                    (Conv("ver.conv", C, C, (3, 1), padding=(1, 0)), BN("ver.bn", C)),
                ),
                Conv("fused", C, C, 3, padding=1),
            ),
            Act("silu"),
        ),
    )


def dbb(name: str = "") -> Block:
    """Diverse Branch Block: 1x1 -> PadBN -> avg pool, 1x1 -> PadBN -> 3x3; numeric paths."""
    return Block(
        name,
        "DBBTestBlock",
        (
            Rep(
                (
                    (Conv("dbb_origin.conv", C, C, 3, padding=1), BN("dbb_origin.bn", C)),
                    (Conv("dbb_1x1.conv", C, C, 1), BN("dbb_1x1.bn", C)),
                    (Conv("dbb_avg.conv", C, C, 1), PadBN("dbb_avg.bn", C, 1), AvgPool(3), BN("dbb_avg.avgbn", C)),
                    (
                        Conv("dbb_1x1_kxk.idconv1", C, C, 1),
                        PadBN("dbb_1x1_kxk.bn1", C, 1),
                        Conv("dbb_1x1_kxk.conv2", C, C, 3),
                        BN("dbb_1x1_kxk.bn2", C),
                    ),
                ),
                Conv("dbb_reparam", C, C, 3, padding=1),
            ),
            Act("relu"),
        ),
    )


def mobileone(name: str = "") -> Block:
    """Identity (empty branch), a per-channel Scale branch and a BN after the sum (QARepVGG)."""
    return Block(
        name,
        "SumBNTestBlock",
        (
            Rep(
                (
                    (Conv("rbr_dense.0", C, C, 3, padding=1), BN("rbr_dense.1", C)),
                    (Conv("rbr_1x1.0", C, C, 1, bias=True),),
                    (Scale("rbr_scale", C),),
                    (),
                ),
                Conv("rbr_reparam", C, C, 3, padding=1),
                bn=BN("bn", C),
            ),
            Act("hard_sigmoid"),
            SE("se", C, 2, "fc1", "fc2", "hard_sigmoid"),
        ),
    )


def concat(name: str = "") -> Block:
    """Concatenated branches (5 + 3 channels), then a non-fusable residual Add."""
    return Block(
        name,
        "ConcatTestBlock",
        (
            Rep(
                ((Conv("a.conv", C, 5, 3, padding=1), BN("a.bn", 5)), (Conv("b.conv", C, 3, 1), BN("b.bn", 3))),
                Conv("cat", C, C, 3, padding=1),
                combine="concat",
            ),
            Add(((Act("sigmoid"), Conv("post.0", C, C, 1, groups=2, bias=True)), ())),
            Act("identity"),
        ),
    )


BLOCKS = {"acnet": acnet, "dbb": dbb, "sum_bn": mobileone, "concat": concat}


@pytest.mark.parametrize("key", list(BLOCKS))
def test_new_kinds_match_the_oracle_in_both_forms(key):
    desc = BLOCKS[key]()
    block = build_block(desc)
    assert type(block) is block_class(desc.kind) and issubclass(type(block), RepModule)
    assert type(block).__name__ == desc.kind and block_class(desc.kind) is type(block)
    schema = block_schema(desc, "train")
    native = block.state_dict()
    assert set(native) == set(schema)  # numeric and dotted paths give exactly the canonical keys
    for k, info in schema.items():
        assert tuple(native[k].shape) == to_megengine(np.zeros(info.shape, np.float32), info).shape
    params = random_state(desc, "train", seed=4)
    load_state(block, params)
    back = export_state(block)
    assert all(np.array_equal(back[k], params[k]) for k in params)
    x = rand_input((2, C, 9, 7), 5)
    ref = oracle.block_forward(desc, params, x, "train")
    assert rel_err(predict(block, x), ref) <= BLOCK_RTOL
    deployed = reparameterize(block)
    assert deployed.deploy and type(deployed) is type(block)
    dstate = export_state(deployed)
    expected = reparameterize_state(desc, params)
    assert list(dstate) == list(block_schema(desc, "deploy"))
    for k in expected:
        assert np.allclose(dstate[k], expected[k], rtol=1e-6, atol=1e-6), k
    assert rel_err(predict(deployed, x), ref) <= BLOCK_RTOL
    assert deployed.rep_blocks() == [] and [p for p, _ in block.rep_blocks()] == [""]


def tiny_model() -> Model:
    return Model(
        "tiny",
        "TinyTestNet",
        (
            acnet("stem"),
            dbb("stages.0.0"),
            mobileone("stages.0.1"),
            concat("stages.1.0"),
            GlobalPool(),
            Flatten(),
            Dropout(0.3),
            Linear("head.fc", C, 5),
        ),
        aux=(
            Aux(
                "stages_aux",
                "stages.0.1",
                (
                    Conv("stages_aux.0.conv", C, C, 3, stride=2, padding=1),
                    BN("stages_aux.0.bn", C),
                    Act("relu"),
                    GlobalPool(),
                    Flatten(),
                    Linear("stages_aux.3", C, 5),
                ),
            ),
        ),
    )


def test_generic_model_aux_heads_state_and_trace(tmp_path):
    desc = tiny_model()
    model = model_from_spec(desc)
    assert type(model).__name__ == "TinyTestNet"
    assert type(model.stages[0][1]).__name__ == "SumBNTestBlock"  # scopes index like Sequential
    assert [p for p, _ in model.rep_blocks()] == ["stem", "stages.0.0", "stages.0.1", "stages.1.0"]
    assert set(model.state_dict()) == set(schema_for(desc, "train"))
    state = random_state(desc, "train", seed=8)
    load_state(model, state)
    x = rand_input((2, C, 12, 12), 2)
    model.eval()
    out = model.forward_with_aux(mge.tensor(x))
    ref = oracle.forward_with_aux(desc, state, x)
    # measured 1.4e-7 / 1.1e-7 (main, aux head), deploy 8.5e-8, traced 1.1e-7;
    # model_tolerance: 1.5e-5 (5 convs deep)
    tol = model_tolerance(desc)
    assert set(out) == set(ref) == {"main", "stages_aux"}
    assert all(rel_err(out[k].numpy(), ref[k]) <= tol for k in ref)
    deployed = reparameterize(model)
    assert set(deployed.state_dict()) == set(schema_for(desc, "deploy"))
    assert rel_err(predict(deployed, x), ref["main"]) <= tol
    with pytest.raises(ReparamError, match="train form only"):
        deployed.forward_with_aux(mge.tensor(x))
    path = export_traced(model, tmp_path / "tiny.mge", input_shape=x.shape)
    assert rel_err(run_traced(path, x), ref["main"]) <= tol


def test_reparameterize_copies_and_keeps_the_mode():
    """The deploy module shares no storage with its source (pass-through tensors included) and
    keeps its train/eval mode; a deploy module converts to itself."""
    desc = tiny_model()
    model = load_state(model_from_spec(desc), random_state(desc, "train", seed=1))
    model.eval()
    deployed = reparameterize(model)
    assert not deployed.training and reparameterize(deployed) is deployed
    head = deployed.head.fc.weight.numpy().copy()
    model.head.fc.weight[...] = np.zeros(model.head.fc.weight.shape, np.float32)
    np.testing.assert_array_equal(deployed.head.fc.weight.numpy(), head)
    assert not np.array_equal(model.head.fc.weight.numpy(), head)
    model.train()
    assert reparameterize(model).training


def test_kind_checks_and_class_registry():
    assert block_class("RepVGGBlock") is RepVGGBlock
    assert block_class("SomeNewBlock") is block_class("SomeNewBlock")
    with pytest.raises(ReparamError, match="RepVGGBlock"):
        RepVGGBlock(acnet())
    with pytest.raises(ReparamError, match="already taken"):
        build_block(Block("", "ClashTestBlock", (Conv("x", C, C, 1), Conv("x", C, C, 1))))
    with pytest.raises(ReparamError, match="spec"):  # a leaf may not shadow a module attribute
        build_block(Block("", "ClashTestBlock", (Conv("spec", C, C, 1),)))
