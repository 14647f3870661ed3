"""The torch builders of the generic nodes of issue 26 (exact GELU, BN over N x C, Scale / Bias
with their official keys and shapes, pointwise Linear, LayerNorm, GRN, Attention; Rep
coefficients, scale after the BN, residual, a Linear as fused form), each in small blocks and
models described with nodes: train and deploy outputs against the float64 oracle, state keys and
shapes against the schema in both forms, and ONNX through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_testutil import BLOCK_RTOL, rel_err

import backends.torch as bt
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
    in_form,
    random_tensors,
    reparameterize_state,
    schema_of,
)
from reparam_core.blocks import oracle
from reparam_core.blocks.nodes import Description

C = 4


def _mobileone(name: str, k: int, scale_branch: bool, convs: int) -> tuple[tuple, ...]:
    """The branches of a depthwise MobileOne block without activation (FastViT's RepMixer parts):
    identity BN `rbr_skip`, optional 1x1 `rbr_scale`, `convs` kxk conv + BN `rbr_conv.i`."""
    out: list[tuple] = [(BN(f"{name}.rbr_skip", C),)]
    if scale_branch:
        out.append((Conv(f"{name}.rbr_scale.conv", C, C, 1, groups=C), BN(f"{name}.rbr_scale.bn", C)))
    for i in range(convs):
        conv = Conv(f"{name}.rbr_conv.{i}.conv", C, C, k, padding=k // 2, groups=C)
        out.append((conv, BN(f"{name}.rbr_conv.{i}.bn", C)))
    return tuple(out)


def _repmixer() -> Block:
    """FastViT's RepMixer: x + layer_scale (mixer(x) - norm(x)), layer scale stored (C, 1, 1)."""
    mixer, norm = _mobileone("mixer", 3, True, 1), _mobileone("norm", 3, False, 0)
    return Block(
        "",
        "RepMixerTest",
        (
            Rep(
                mixer + norm,
                Conv("reparam_conv", C, C, 3, padding=1, groups=C),
                coefficients=(1.0,) * len(mixer) + (-1.0,) * len(norm),
                scale=Scale("", C, param="layer_scale", shape=(C, 1, 1)),
                residual=True,
            ),
        ),
    )


def _heads_model() -> Model:
    """A classifier whose two BN1d -> Linear heads are averaged (RepViT-like), in a nested block
    after GlobalPool + Flatten, with a LayerNorm, a Scale and a Bias on N x C before it."""
    d, classes = 6, 5
    heads = tuple((BN(f"{h}.bn", d, dims=1), Linear(f"{h}.l", d, classes)) for h in ("head", "head_dist"))
    return Model(
        "heads",
        "HeadsTest",
        (
            Block("stem", "StemTest", (Conv("conv", 3, d, 3, stride=2, padding=1), BN("bn", d), Act("gelu"))),
            GlobalPool(),
            Flatten(),
            LayerNorm("pre_norm", d),
            Scale("pre_scale", d, param="gamma"),
            Bias("pre_shift", d),
            Block("classifier", "ClassifierTest", (Rep(heads, Linear("fused", d, classes), coefficients=(0.5, 0.5)),)),
        ),
    )


def _unireplknet() -> Block:
    """A UniRepLKNet-like block: x + [dilated depthwise Rep + BN after, SE, pwconv1 (Linear on
    NCHW), GELU, GRN without beta, Rep(GRN beta, pwconv2 (no bias), BN, block-level `gamma`)
    fused into one Linear]."""
    ffn = 2 * C
    dilated = Rep(
        tuple(
            (
                Conv(f"dwconv.{n}", C, C, k, padding=r * (k - 1) // 2, dilation=r, groups=C),
                BN(f"dwconv.{b}", C),
            )
            for n, b, k, r in (
                ("lk_origin", "origin_bn", 7, 1),
                ("dil_conv_k5_1", "dil_bn_k5_1", 5, 1),
                ("dil_conv_k3_2", "dil_bn_k3_2", 3, 2),
            )
        ),
        Conv("dwconv.lk_origin", C, C, 7, padding=3, groups=C),
        bn=BN("norm", C),
    )
    pw2 = Rep(
        ((Bias("grn", ffn, param="beta", shape=(1, 1, 1, ffn)), Linear("pwconv2.0", ffn, C, bias=False)),),
        Linear("pwconv2.0", ffn, C),
        bn=BN("pwconv2.1", C),
        scale=Scale("", C, param="gamma"),
    )
    body = (
        dilated,
        SE("se", C, 2, "down", "up"),
        Linear("pwconv1", C, ffn),
        Act("gelu"),
        GRN("grn", ffn, bias=False),
        pw2,
    )
    return Block("", "UniRepLKNetBlockTest", (Add(((), body)),))


def _attention() -> Block:
    """A FastViT-like attention block: x + attn(LN(x)), then GRN (with beta), LayerNorm, GELU."""
    d = 8
    return Block(
        "",
        "AttentionTest",
        (
            Add(((), (LayerNorm("norm", d), Attention("token_mixer", d, 2, qkv_bias=True)))),
            GRN("grn", d),
            LayerNorm("norm2", d),
            Act("gelu"),
        ),
    )


CASES: dict[str, tuple[Description, tuple[int, ...]]] = {
    "repmixer": (_repmixer(), (2, C, 7, 6)),
    "averaged-heads": (_heads_model(), (2, 3, 8, 8)),
    "unireplknet": (_unireplknet(), (2, C, 9, 8)),
    "attention": (_attention(), (2, 8, 4, 5)),
}


def _state(desc: Description, seed: int = 0) -> dict[str, np.ndarray]:
    return random_tensors(schema_of(desc), seed)


def _input(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _shapes(module: bt.RepModule) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def _schema_shapes(desc: Description) -> dict[str, tuple[int, ...]]:
    return {k: info.shape for k, info in schema_of(desc).items()}


@pytest.mark.parametrize("case", list(CASES))
def test_keys_equal_the_schema_in_both_forms(case: str) -> None:
    desc, _ = CASES[case]
    for form, deploy in (("train", False), ("deploy", True)):
        assert _shapes(bt.build_block(desc, deploy=deploy)) == _schema_shapes(in_form(desc, form))
    module = bt.load_state(bt.build_block(desc), _state(desc))
    assert _shapes(module.reparameterize()) == _schema_shapes(in_form(desc, "deploy"))


@pytest.mark.parametrize("case", list(CASES))
def test_train_and_deploy_equal_the_oracle(case: str) -> None:
    desc, shape = CASES[case]
    state = _state(desc)
    bn_var = [v for k, v in state.items() if k.endswith("running_var")]
    assert all(np.ptp(v) > 0 and abs(v.mean() - 1) > 1e-3 for v in bn_var)  # BN statistics drawn
    x = _input(shape)
    module = bt.load_state(bt.build_block(desc), state)
    want = oracle.forward(desc, state, x, "train")
    assert rel_err(bt.predict(module, x), want) <= BLOCK_RTOL
    deploy = module.reparameterize()
    assert rel_err(bt.predict(deploy, x), want) <= BLOCK_RTOL
    fused = reparameterize_state(desc, state)
    assert rel_err(oracle.forward(desc, fused, x, "deploy"), want) <= BLOCK_RTOL  # float32 fused state
    # torch's own loading: check_state reads a state of a description without a Rep (the same
    # keys in both forms) as train form and refuses it for a deploy-form module
    built = bt.build_block(desc, deploy=True)
    result = built.load_state_dict({k: torch.from_numpy(v) for k, v in fused.items()}, strict=False)
    assert not result.unexpected_keys and all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    assert rel_err(bt.predict(built, x), want) <= BLOCK_RTOL


def test_native_modules_and_where_parameters_sit() -> None:
    heads = bt.build_block(_heads_model())
    assert type(heads.classifier.head.bn) is nn.BatchNorm1d and type(heads.stem.bn) is nn.BatchNorm2d
    assert type(heads.classifier.head.l) is nn.Linear and type(heads.pre_norm) is nn.LayerNorm
    assert heads.classifier.rank == 2 and heads.stem.rank == 4
    block = bt.build_block(_unireplknet())
    assert type(block.pwconv1) is nn.Linear and block.pwconv2[0].bias is None
    assert block.gamma.shape == (C,) and block.grn.beta.shape == (1, 1, 1, 2 * C)  # on the owner, on the GRN
    mixer = bt.build_block(_repmixer())
    assert mixer.layer_scale.shape == (C, 1, 1)
    deploy = block.reparameterize()
    assert type(deploy.pwconv2[0]) is nn.Linear and deploy.pwconv2[0].bias is not None
    assert not hasattr(deploy, "gamma")


def test_gelu_is_exact() -> None:
    block = bt.build_block(Block("", "GeluTest", (Act("gelu"),)))
    x = torch.linspace(-4, 4, 97).reshape(1, 1, 1, 97)
    assert torch.equal(block(x), F.gelu(x)) and not torch.equal(block(x), F.gelu(x, approximate="tanh"))


def test_attention_layernorm_grn_block_in_onnx(tmp_path) -> None:
    desc, shape = CASES["attention"]
    state = _state(desc)
    module = bt.load_state(bt.build_block(desc), state)
    x = _input((1, *shape[1:]))
    path = bt.export_onnx(module, tmp_path / "attention.onnx", input_shape=x.shape)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    assert rel_err(y, oracle.forward(desc, state, x, "train")) <= BLOCK_RTOL


@pytest.mark.parametrize("case", ["unireplknet", "repmixer"])
def test_fused_linear_and_residual_rep_in_onnx(case: str, tmp_path) -> None:
    desc, shape = CASES[case]
    state = _state(desc)
    module = bt.load_state(bt.build_block(desc), state)
    x = _input((1, *shape[1:]))
    path = bt.export_onnx(module, tmp_path / f"{case}.onnx", input_shape=x.shape)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    assert rel_err(y, oracle.forward(desc, state, x, "train")) <= BLOCK_RTOL
