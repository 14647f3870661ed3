"""The generic nodes of issue 26 in MegEngine, built by the generic RepModule from small
descriptions (no family code): exact GELU, BN over N x C, Scale/Bias under their official names
and shapes (a block-level `gamma` / `layer_scale` included), Linear over axis 1 (pointwise on
N x C x H x W, with and without bias), LayerNorm, GRN, Attention, and Reps with coefficients, a
scale after the BN, a residual, and a Linear as fused form. Native names == schema in both forms,
neutral load/export round trips, train and deploy outputs vs the float64 oracle, a traced
artifact, and the worker (descriptions as JSON)."""

from __future__ import annotations

import math

import megengine as mge
import megengine.functional as F
import numpy as np
import pytest
from mge_testutil import BLOCK_RTOL, model_tolerance, rand_input, rel_err

from backends.megengine import (
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
from backends.megengine.remote import MgeWorker
from reparam_core import (
    BN,
    GRN,
    SE,
    Act,
    Add,
    Attention,
    Bias,
    Block,
    Conv,
    Flatten,
    GlobalPool,
    LayerNorm,
    Linear,
    Model,
    Rep,
    Scale,
    block_schema,
    random_state,
    reparameterize_state,
    schema_for,
)
from reparam_core.blocks import oracle
from reparam_core.weights.layouts import to_megengine

C, HIDDEN, CLASSES = 8, 16, 5


def dw(name: str, k: int, dilation: int = 1) -> Conv:
    """A depthwise k x k conv padded to keep the size (its extent centred on the fused k)."""
    return Conv(name, C, C, k, padding=(dilation * (k - 1) + 1) // 2, dilation=dilation, groups=C)


def repmixer(name: str = "") -> Block:
    """FastViT's RepMixer: x + layer_scale (mixer(x) - norm(x)), mixer and norm MobileOne-style
    depthwise branches (conv + BN, 1x1 conv + BN, BN) at +1 and -1."""
    mixer = (
        (dw("mixer.rbr_conv.0.conv", 3), BN("mixer.rbr_conv.0.bn", C)),
        (dw("mixer.rbr_scale.conv", 1), BN("mixer.rbr_scale.bn", C)),
        (BN("mixer.rbr_skip", C),),
    )
    norm = ((dw("norm.rbr_conv.0.conv", 3), BN("norm.rbr_conv.0.bn", C)), (BN("norm.rbr_skip", C),))
    return Block(
        name,
        "RepMixerTestBlock",
        (
            Rep(
                mixer + norm,
                dw("reparam_conv", 3),
                coefficients=(1.0,) * len(mixer) + (-1.0,) * len(norm),
                scale=Scale("", C, param="layer_scale", shape=(C, 1, 1)),
                residual=True,
            ),
        ),
    )


def unireplk(name: str = "") -> Block:
    """UniRepLKNet's block: a dilated depthwise Rep with the block's BN after the sum, SE, the
    pointwise Linear `pwconv1` on NCHW, GELU, GRN without beta, then beta + Linear without bias +
    BN + the block's `gamma` fused into one Linear; the residual as a plain Add."""
    dilated = Rep(
        (
            (dw("dwconv.lk_origin", 7), BN("dwconv.origin_bn", C)),
            (dw("dwconv.dil_conv_k5_1", 5), BN("dwconv.dil_bn_k5_1", C)),
            (dw("dwconv.dil_conv_k3_2", 3, 2), BN("dwconv.dil_bn_k3_2", C)),
            (dw("dwconv.dil_conv_k3_3", 3, 3), BN("dwconv.dil_bn_k3_3", C)),
        ),
        dw("dwconv.lk_origin", 7),
        bn=BN("norm", C),
    )
    pwconv2 = Rep(
        ((Bias("act.1", HIDDEN, param="beta", shape=(1, 1, 1, HIDDEN)), Linear("pwconv2.0", HIDDEN, C, bias=False)),),
        Linear("pwconv2.0", HIDDEN, C),
        bn=BN("pwconv2.2", C),
        scale=Scale("", C, param="gamma"),
    )
    body = (
        dilated,
        SE("se", C, C // 4, "down", "up"),
        Linear("pwconv1.1", C, HIDDEN),
        Act("gelu"),
        GRN("act.1", HIDDEN, bias=False),
        pwconv2,
    )
    return Block(name, "UniRepLKTestBlock", (Add((body, ())),))


def attention(name: str = "") -> Block:
    """LayerNorm (channels first) -> 2-head attention, residual; then a layer scale module."""
    return Block(
        name,
        "AttentionTestBlock",
        (
            Add(((LayerNorm("norm", C), Attention("token_mixer", C, 2)), ())),
            Scale("layer_scale_2", C, param="gamma"),
            Bias("shift", C),
        ),
    )


BLOCKS = {"repmixer": repmixer, "unireplk": unireplk, "attention": attention}


def heads_model() -> Model:
    """The blocks in a chain, LayerNorm on N x C, then two BN1d -> Linear heads averaged."""
    heads = Rep(
        (
            (BN("head.bn", C, dims=1), Linear("head.l", C, CLASSES)),
            (BN("head_dist.bn", C, dims=1), Linear("head_dist.l", C, CLASSES)),
        ),
        Linear("head.l", C, CLASSES),
        coefficients=(0.5, 0.5),
    )
    return Model(
        "tiny",
        "NewNodesTestNet",
        (
            repmixer("stages.0"),
            unireplk("stages.1"),
            attention("stages.2"),
            GlobalPool(),
            Flatten(),
            LayerNorm("final_norm", C, eps=1e-5),
            heads,
        ),
    )


def native_shapes_match(module, schema) -> None:
    native = module.state_dict()
    assert list(sorted(native)) == sorted(schema)
    for k, info in schema.items():
        assert tuple(native[k].shape) == to_megengine(np.zeros(info.shape, np.float32), info).shape, k


@pytest.mark.parametrize("key", list(BLOCKS))
def test_blocks_match_the_oracle_in_both_forms(key):
    desc = BLOCKS[key]()
    block = build_block(desc)
    assert type(block) is block_class(desc.kind)
    native_shapes_match(block, block_schema(desc, "train"))
    params = random_state(desc, "train", seed=4)
    load_state(block, params)
    back = export_state(block)
    assert list(back) == list(block_schema(desc, "train"))
    assert all(np.array_equal(back[k], params[k]) for k in params)
    x = rand_input((2, C, 8, 6), 5)
    ref = oracle.block_forward(desc, params, x, "train")
    assert rel_err(predict(block, x), ref) <= BLOCK_RTOL
    deployed = reparameterize(block)
    assert deployed.deploy and type(deployed) is type(block)
    native_shapes_match(deployed, block_schema(desc, "deploy"))
    dstate = export_state(deployed)
    expected = reparameterize_state(desc, params)
    assert list(dstate) == list(block_schema(desc, "deploy"))
    for k in expected:
        assert np.allclose(dstate[k], expected[k], rtol=1e-6, atol=1e-6), k
    assert rel_err(predict(deployed, x), ref) <= BLOCK_RTOL
    assert rel_err(predict(deployed, x), oracle.block_forward(desc, expected, x, "deploy")) <= BLOCK_RTOL
    assert all(np.array_equal(export_state(block)[k], params[k]) for k in params)  # source untouched


def test_deploy_form_loads_and_exports_its_own_state():
    desc = unireplk()
    block = build_block(desc, deploy=True)
    native_shapes_match(block, block_schema(desc, "deploy"))
    state = random_state(desc, "deploy", seed=7)
    load_state(block, state)
    back = export_state(block)
    assert list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)
    x = rand_input((1, C, 6, 6), 2)
    assert rel_err(predict(block, x), oracle.block_forward(desc, state, x, "deploy")) <= BLOCK_RTOL


def test_block_level_parameters_sit_on_the_block_in_official_shapes():
    block = build_block(repmixer())
    assert tuple(block.layer_scale.shape) == (C, 1, 1)
    uni = build_block(unireplk())
    assert tuple(uni.gamma.shape) == (C,)
    assert tuple(uni.state_dict()["act.1.beta"].shape) == (1, 1, 1, HIDDEN)
    assert tuple(uni.state_dict()["act.1.gamma"].shape) == (1, 1, 1, HIDDEN)
    assert uni.pwconv2[0].bias is None  # Linear without bias in train form
    assert build_block(unireplk(), deploy=True).pwconv2[0].bias is not None


def test_gelu_is_the_exact_erf_form():
    x = np.linspace(-6.0, 6.0, 2001, dtype=np.float32)
    exact = oracle.gelu(x.astype(np.float64))
    tanh = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    y = F.gelu(mge.tensor(x)).numpy()
    assert np.abs(y - exact).max() < 1e-6 < np.abs(tanh - exact).max()


def test_model_with_averaged_heads_matches_the_oracle_and_traces(tmp_path):
    spec = heads_model()
    model = model_from_spec(spec)
    native_shapes_match(model, schema_for(spec, "train"))
    params = random_state(spec, "train", seed=3)
    load_state(model, params)
    x = rand_input((2, C, 8, 6), 6)
    ref = oracle.forward(spec, params, x, "train")
    tol = model_tolerance(spec)
    assert rel_err(predict(model, x), ref) <= tol
    deployed = reparameterize(model)
    native_shapes_match(deployed, schema_for(spec, "deploy"))
    dstate = export_state(deployed)
    assert list(dstate) == list(schema_for(spec, "deploy"))
    assert [k for k in dstate if k.startswith("head")] == ["head.l.weight", "head.l.bias"]
    assert rel_err(predict(deployed, x), ref) <= tol
    art = export_traced(model, tmp_path / "new_nodes.mge", input_shape=(1, C, 8, 6))
    assert rel_err(run_traced(art, x), ref) <= tol


def test_worker_runs_a_description_with_the_new_nodes():
    """The worker receives the block as JSON (reparam_core.blocks.nodes_io) and builds it."""
    desc = unireplk()
    params = random_state(desc, "train", seed=9)
    x = rand_input((1, C, 6, 6), 3)
    ref = oracle.block_forward(desc, params, x, "train")
    with MgeWorker() as worker:
        y, state = worker.predict(state=params, x=x, block=desc, reparameterize=True, return_state=True)
    assert rel_err(y, ref) <= BLOCK_RTOL
    expected = reparameterize_state(desc, params)
    assert set(state) == set(block_schema(desc, "deploy")) == set(expected)  # safetensors sorts keys
    assert all(np.allclose(state[k], expected[k], rtol=1e-6, atol=1e-6) for k in expected)
