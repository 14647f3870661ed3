"""The generic build on descriptions no current family uses: every node type (PadBN chains,
average pooling, per-channel scale, non-square kernels, channel concatenation, a BN after the
sum, nested blocks in a residual Add, SE gates, dropout, auxiliary heads) built by the torch
backend with no family code, against the float64 oracle in train form and after
reparameterize(); classes made on the fly for unknown kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_testutil import BLOCK_RTOL, FUSE_RTOL, rel_err

import backends.torch as bt
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
    random_tensors,
    reparameterize_state,
    schema_of,
    to_deploy,
)
from reparam_core.blocks import oracle


def _cbn(name: str, cin: int, cout: int, kernel, padding, **geo) -> tuple:
    return Conv(f"{name}.conv", cin, cout, kernel, padding=padding, **geo), BN(f"{name}.bn", cout)


BLOCKS = {
    "dbb-padbn-avgpool": Block(
        "",
        "DBBTest",
        (
            Rep(
                (
                    _cbn("dbb_origin", 4, 4, 3, 1),
                    (
                        Conv("dbb_1x1_kxk.idconv1", 4, 6, 1),
                        PadBN("dbb_1x1_kxk.bn1", 6, 1),
                        Conv("dbb_1x1_kxk.conv2", 6, 4, 3),
                        BN("dbb_1x1_kxk.bn2", 4),
                    ),
                    (
                        Conv("dbb_avg.conv", 4, 4, 1),
                        PadBN("dbb_avg.bn", 4, 1),
                        AvgPool(3, 1, 0),
                        BN("dbb_avg.avgbn", 4),
                    ),
                    _cbn("dbb_1x1", 4, 4, 1, 0),
                ),
                Conv("dbb_reparam", 4, 4, 3, padding=1),
            ),
            Act("relu"),
        ),
    ),
    "acnet-non-square-g2-s2": Block(
        "",
        "ACBTest",
        (
            Rep(
                (
                    _cbn("square", 4, 6, 3, 1, stride=2, groups=2),
                    _cbn("hor", 4, 6, (1, 3), (0, 1), stride=2, groups=2),
                    _cbn("ver", 4, 6, (3, 1), (1, 0), stride=2, groups=2),
                ),
                Conv("fused", 4, 6, 3, padding=1, stride=2, groups=2),
            ),
            Act("silu"),
        ),
    ),
    "mobileone-scale-identity": Block(
        "",
        "MobileOneTest",
        (
            Rep(
                (
                    (Conv("rbr_conv.0.conv", 6, 6, 3, padding=1, groups=3), BN("rbr_conv.0.bn", 6)),
                    (Conv("rbr_scale.conv", 6, 6, 1, groups=3), Scale("rbr_scale.scale", 6)),
                    (Scale("rbr_skip", 6),),
                    (BN("rbr_identity", 6),),
                ),
                Conv("reparam_conv", 6, 6, 3, padding=1, groups=3),
            ),
            SE("se", 6, 2, "reduce", "expand", "hard_sigmoid"),
            Act("hard_sigmoid"),
        ),
    ),
    "qarepvgg-bn-after-sum": Block(
        "",
        "QARepVGGTest",
        (
            Rep(
                (_cbn("rbr_dense", 4, 4, 3, 1), (Conv("rbr_1x1", 4, 4, 1, bias=True),), ()),
                Conv("rbr_reparam", 4, 4, 3, padding=1),
                bn=BN("bn", 4),
            ),
            Act("relu"),
        ),
    ),
    "concat-non-square-fused": Block(
        "",
        "ConcatTest",
        (
            Rep(
                (_cbn("a", 3, 2, (1, 5), (0, 2)), _cbn("b", 3, 3, (1, 1), (0, 0))),
                Conv("fused", 3, 5, (1, 5), padding=(0, 2)),
                combine="concat",
            ),
            Act("sigmoid"),
        ),
    ),
}

INNER = Block(
    "inner", "ToyRepBlock", (Rep((_cbn("dense", 8, 8, 3, 1), ()), Conv("reparam", 8, 8, 3, padding=1)), Act("relu"))
)
TOY = Model(
    "toy",
    "ToyNet",
    (
        Conv("stem", 3, 8, 3, stride=2, padding=1),
        BN("stem_bn", 8),
        Act("relu"),
        Block("stages.0", "ToyRepBlock", INNER.body),
        Block("stages.1", "ToyResidual", (Add(((INNER, SE("se", 8, 2)), (_cbn("down", 8, 8, 1, 0)))),)),
        GlobalPool(),
        Flatten(),
        Dropout(0.5),
        Linear("head", 8, 5),
    ),
    aux=(Aux("stages_aux", "stages.0", (GlobalPool(), Flatten(), Linear("stages_aux.fc", 8, 5))),),
)


def _keys(module: bt.RepModule) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def _check(desc, x: np.ndarray) -> tuple[bt.RepModule, dict]:
    """Build, load, compare train and deploy forms with the oracle; returns (train, state)."""
    module = bt.build_block(desc)
    assert type(module) is bt.block_class(desc.kind) and type(module).kind == desc.kind
    schema = schema_of(desc)
    assert list(_keys(module)) == list(schema)
    assert _keys(module) == {k: info.shape for k, info in schema.items()}
    state = random_tensors(schema, seed=4)
    bt.load_state(module, state)
    expected = oracle.forward(desc, state, x, "train")
    assert rel_err(bt.predict(module, x), expected) <= BLOCK_RTOL

    deploy = module.reparameterize()
    assert type(deploy) is type(module) and deploy.deploy
    assert _keys(deploy) == {k: info.shape for k, info in schema_of(to_deploy(desc)).items()}
    assert rel_err(bt.predict(deploy, x), expected) <= BLOCK_RTOL
    got = bt.export_state(deploy)
    for k, v in reparameterize_state(desc, state).items():
        assert np.abs(got[k] - v).max() <= FUSE_RTOL * max(np.abs(v).max(), 1e-12), k
    return module, state


@pytest.mark.parametrize("case", list(BLOCKS))
def test_every_node_type_builds_and_converts(case: str) -> None:
    desc = BLOCKS[case]
    cin = desc.body[0].fused.in_channels
    _check(desc, np.random.default_rng(0).standard_normal((2, cin, 9, 7)).astype(np.float32))


def test_model_of_unknown_kinds_with_residual_nested_blocks_and_aux() -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 10)).astype(np.float32)
    model, state = _check(TOY, x)
    assert bt.block_class("ToyNet") is type(model) and issubclass(type(model), bt.RepModule)
    assert type(model.stages[0]) is bt.block_class("ToyRepBlock")
    assert type(model.get_submodule("stages.1.inner")) is bt.block_class("ToyRepBlock")
    assert [p for p, _ in model.rep_blocks()] == ["stages.0", "stages.1.inner"]
    model.eval()
    with torch.no_grad():
        out = {k: v.numpy() for k, v in model.forward_with_aux(torch.from_numpy(x)).items()}
    want = oracle.forward_with_aux(TOY, state, x)
    assert set(out) == set(want) == {"main", "stages_aux"}
    assert all(rel_err(out[k], want[k]) <= BLOCK_RTOL for k in want)
    model.train()  # dropout acts in training mode only
    torch.manual_seed(0)
    y1, y2 = model(torch.from_numpy(x)), model(torch.from_numpy(x))
    assert not torch.equal(y1, y2)


def test_unknown_kind_class_refuses_other_kinds() -> None:
    cls = bt.block_class("DBBTest")
    with pytest.raises(ReparamError, match="'DBBTest' spec, got a 'ACBTest' one"):
        cls(BLOCKS["acnet-non-square-g2-s2"])
    with pytest.raises(ReparamError, match="use build_block"):
        bt.RepModule(BLOCKS["dbb-padbn-avgpool"])
