"""Every node type of the block description through the generic Flax module, against the
float64 oracle in train and deploy form: node types no registered family uses yet (PadBN,
average pool, per-channel scale, non-square and asymmetric kernels, a BN after the sum,
channel concatenation, plain residual Add, dropout, linear heads) must need no backend code.
Stride-2 cases use even sizes (Flax 'SAME' would pad them (0, 1) where torch pads (1, 1))."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax_testutil import BLOCK_RTOL, FUSE_RTOL, random_params, rel_err

import backends.flax as bf
from backends.flax.state import variables
from reparam_core import (
    BN,
    SE,
    Act,
    Add,
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
    Scale,
    reparameterize_state,
)
from reparam_core.blocks import oracle
from reparam_core.blocks.nodes import to_deploy
from reparam_core.blocks.schema import schema_of
from reparam_core.weights.layouts import flax_key, to_flax

ACNET = Block(
    "",
    "ACBlockTest",
    (
        Rep(
            (
                (Conv("square.conv", 4, 8, 3, stride=2, padding=1, groups=2), BN("square.bn", 8)),
                (Conv("hor.conv", 4, 8, (1, 3), stride=2, padding=(0, 1), groups=2), BN("hor.bn", 8)),
                (Conv("ver.conv", 4, 8, (3, 1), stride=2, padding=(1, 0), groups=2), BN("ver.bn", 8)),
            ),
            Conv("fused_conv", 4, 8, 3, stride=2, padding=1, groups=2),
        ),
        Act("hard_sigmoid"),
    ),
)
DBB = Block(
    "",
    "DBBTest",
    (
        Rep(
            (
                (Conv("dbb_origin.conv", 6, 6, 3, padding=1), BN("dbb_origin.bn", 6)),
                (
                    Conv("dbb_1x1_kxk.idconv1", 6, 6, 1),
                    PadBN("dbb_1x1_kxk.bn1", 6, 1),
                    Conv("dbb_1x1_kxk.conv2", 6, 6, 3),
                    BN("dbb_1x1_kxk.bn2", 6),
                ),
                (Conv("dbb_avg.conv", 6, 6, 1), PadBN("dbb_avg.bn", 6, 1), AvgPool(3), BN("dbb_avg.avgbn", 6)),
                (Conv("scaled.conv", 6, 6, 3, padding=1), Scale("scaled.scale", 6)),
                (Scale("rbr_scale", 6),),
                (),
            ),
            Conv("dbb_reparam", 6, 6, 3, padding=1),
            bn=BN("post_bn", 6),
        ),
        SE("se", 6, 3, "reduce", "expand", "sigmoid"),
        Act("silu"),
    ),
)
WIDE = Block(
    "",
    "WideKernelTest",
    (
        Rep(
            (
                (Conv("a.conv", 4, 4, (3, 5), stride=2, padding=(2, 4), dilation=2, bias=True), BN("a.bn", 4)),
                (Conv("b.conv", 4, 4, 1, stride=2, padding=(0, 0), bias=True), BN("b.bn", 4)),
            ),
            Conv("reparam", 4, 4, (3, 5), stride=2, padding=(2, 4), dilation=2),
        ),
        Act("relu"),
    ),
)
CONCAT = Block(
    "",
    "ConcatTest",
    (
        Rep(
            ((Conv("a.0", 4, 3, 1), BN("a.1", 3)), (Conv("b.0", 4, 5, (3, 1), padding=(1, 0)), BN("b.1", 5))),
            Conv("merged", 4, 8, 3, padding=1),
            combine="concat",
        ),
        Act("sigmoid"),
    ),
)
BLOCKS = [ACNET, DBB, WIDE, CONCAT]
SIZES = {"ACBlockTest": (8, 10), "DBBTest": (7, 9), "WideKernelTest": (10, 12), "ConcatTest": (6, 5)}


def _native_shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.get_value().shape) for k, v in variables(module).items()}


def _expected_shapes(desc) -> dict[str, tuple[int, ...]]:
    return {flax_key(k, i): to_flax(np.zeros(i.shape, np.float32), i).shape for k, i in schema_of(desc).items()}


@pytest.mark.parametrize("desc", BLOCKS, ids=[b.kind for b in BLOCKS])
def test_every_node_type_matches_the_oracle(desc: Block) -> None:
    params = random_params(schema_of(desc), seed=3)
    cin = next(n for n in desc.body if isinstance(n, Rep)).fused.in_channels
    x = np.random.default_rng(4).standard_normal((2, cin, *SIZES[desc.kind])).astype(np.float32)
    block = bf.load_state(bf.empty_block(desc), params)
    assert type(block) is bf.block_class(desc.kind) and isinstance(block, bf.RepModule)
    assert _native_shapes(block) == _expected_shapes(desc)
    expected = oracle.block_forward(desc, params, x, "train")
    y = bf.predict(block, x)
    assert y.shape == expected.shape
    assert rel_err(y, expected) <= BLOCK_RTOL

    deploy = bf.reparameterize(block)
    assert deploy.deploy and type(deploy) is type(block)
    assert _native_shapes(deploy) == _expected_shapes(to_deploy(desc))
    ref = reparameterize_state(desc, params)
    got = bf.export_state(deploy)
    assert list(got) == list(ref)
    for k, v in ref.items():
        assert np.abs(got[k] - v).max() <= FUSE_RTOL * max(np.abs(v).max(), 1e-12), k
    assert rel_err(bf.predict(deploy, x), expected) <= BLOCK_RTOL
    for k, v in bf.export_state(block).items():  # the train form is untouched, bit-exact
        np.testing.assert_array_equal(v, params[k], err_msg=k)


def test_a_model_of_new_kinds_needs_no_backend_code() -> None:
    """A model description with blocks of unwritten kinds (one inside a plain residual Add),
    pooling, dropout and a linear head: built, predicted one segment at a time, converted."""
    ac = Block(
        "blocks.0",
        "ACBlockTest",
        (
            Rep(
                (
                    (Conv("square.conv", 4, 4, 3, padding=1), BN("square.bn", 4)),
                    (Conv("hor.conv", 4, 4, (1, 3), padding=(0, 1)), BN("hor.bn", 4)),
                    (),
                ),
                Conv("fused_conv", 4, 4, 3, padding=1),
            ),
        ),
    )
    dbb = Block(
        "blocks.1",
        "DBBTest",
        (
            Rep(
                (
                    (Conv("dbb_origin.conv", 4, 4, 3, padding=1), BN("dbb_origin.bn", 4)),
                    (Conv("dbb_avg.conv", 4, 4, 1), PadBN("dbb_avg.bn", 4, 1), AvgPool(3), BN("dbb_avg.avgbn", 4)),
                    (),
                ),
                Conv("dbb_reparam", 4, 4, 3, padding=1),
                bn=BN("post_bn", 4),
            ),
            Act("relu"),
        ),
    )
    desc = Model(
        "toy",
        "ToyNet",
        (
            Conv("stem.conv", 3, 4, 3, stride=2, padding=1),
            BN("stem.bn", 4),
            Act("relu"),
            Add(((), (ac,))),
            dbb,
            GlobalPool(),
            Flatten(),
            Dropout(0.5),
            Linear("head.fc", 4, 5),
        ),
    )
    params = random_params(schema_of(desc), seed=5)
    model = bf.load_state(bf.empty_block(desc), params)
    assert type(model) is bf.block_class("ToyNet")
    assert type(model.blocks["1"]) is bf.block_class("DBBTest")
    assert _native_shapes(model) == _expected_shapes(desc)
    x = np.random.default_rng(6).standard_normal((2, 3, 12, 10)).astype(np.float32)
    expected = oracle.forward(desc, params, x, "train")
    y = bf.predict(model, x)
    assert y.shape == (2, 5) and rel_err(y, expected) <= BLOCK_RTOL
    deploy = bf.reparameterize(model)
    assert _native_shapes(deploy) == _expected_shapes(to_deploy(desc))
    assert rel_err(bf.predict(deploy, x), expected) <= BLOCK_RTOL
    xh = jnp.asarray(x.transpose(0, 2, 3, 1))
    view = bf.inference_view(model)  # inference: dropout off, the same output every call
    np.testing.assert_array_equal(np.asarray(view(xh)), np.asarray(view(xh)))
    # training mode: dropout on, each call draws a new mask from the model's stream
    assert not np.array_equal(np.asarray(model(xh)), np.asarray(model(xh)))
