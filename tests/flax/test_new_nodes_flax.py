"""The generic nodes of issue 26 through the Flax backend, against the float64 oracle: exact GELU,
BN over N x C, Scale/Bias with official keys and stored shapes (a parameter on the block itself),
pointwise and classifier Linears, LayerNorm, GRN, Attention, and Rep coefficients, a scale after
the BN, a residual and a Linear as the fused form. Small blocks shaped like FastViT's RepMixer,
RepViT's averaged heads and UniRepLKNet's block; no family code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax_testutil import BLOCK_RTOL, FUSE_RTOL, random_params, rel_err

import backends.flax as bf
from backends.flax.state import native_state, variables
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
    reparameterize_state,
)
from reparam_core.blocks import oracle
from reparam_core.blocks.nodes import Description, in_form
from reparam_core.blocks.schema import schema_of
from reparam_core.weights.layouts import flax_key, to_flax


def _conv_bn(name: str, c: int, k: int, dilation: int = 1) -> tuple[Conv, BN]:
    pad = dilation * (k - 1) // 2
    return Conv(f"{name}.conv", c, c, k, padding=pad, dilation=dilation, groups=c), BN(f"{name}.bn", c)


# FastViT RepMixer: x + s (mixer(x) - norm(x)), MobileOne-style depthwise branches, s (C, 1, 1)
# on the block itself
REPMIXER = Block(
    "",
    "RepMixerTest",
    (
        Rep(
            (
                _conv_bn("mixer.rbr_conv.0", 4, 3),
                _conv_bn("mixer.rbr_scale", 4, 1),
                (BN("mixer.rbr_skip", 4),),
                _conv_bn("norm.rbr_conv.0", 4, 3),
                (BN("norm.rbr_skip", 4),),
            ),
            Conv("reparam_conv", 4, 4, 3, padding=1, groups=4),
            coefficients=(1.0, 1.0, 1.0, -1.0, -1.0),
            scale=Scale("", 4, "layer_scale", (4, 1, 1)),
            residual=True,
        ),
    ),
)

# UniRepLKNet: dilated reparam (BN after), SE, pwconv1 (Linear on NCHW), GELU, GRN whose beta
# folds into pwconv2 (Linear without bias) + BN + the block's `gamma`, all one Linear; residual
_UNIREP_BODY = (
    Rep(
        (_conv_bn("dwconv.k7", 4, 7), _conv_bn("dwconv.k5", 4, 5), _conv_bn("dwconv.k3d2", 4, 3, 2)),
        Conv("dwconv.lk_origin", 4, 4, 7, padding=3, groups=4),
        bn=BN("norm", 4),
    ),
    SE("se", 4, 2),
    Linear("pwconv1.1", 4, 16),
    Act("gelu"),
    GRN("act.1", 16, bias=False),
    Rep(
        ((Bias("act.1", 16, "beta", (1, 1, 1, 16)), Linear("pwconv2.0", 16, 4, bias=False)),),
        Linear("pwconv2.0", 16, 4),
        bn=BN("pwconv2.2", 4),
        scale=Scale("", 4, "gamma"),
    ),
)
UNIREPLK = Block("", "UniRepLKNetBlockTest", (Add(((), _UNIREP_BODY)),))

# FastViT-like: a conditional positional encoding x + dwconv(x) (RepCPE, fused with its residual),
# a token mixer x + attention(layer_norm(x)) with 2 heads, a GRN with its own beta
ATTENTION = Block(
    "",
    "AttentionTest",
    (
        Rep(
            ((Conv("pe", 8, 8, 3, padding=1, groups=8, bias=True),),),
            Conv("reparam_conv", 8, 8, 3, padding=1, groups=8),
            residual=True,
        ),
        Add(((), (LayerNorm("norm", 8), Attention("token_mixer", 8, 2, qkv_bias=True)))),
        GRN("grn", 8),
        Act("gelu"),
    ),
)

# averaged BN1d -> Linear heads (RepViT's classifier with distillation), after a stem, pooling,
# a LayerNorm and a Scale on N x C held by the model itself
HEADS = Model(
    "heads",
    "HeadsTest",
    (
        Conv("stem.conv", 3, 8, 3, stride=2, padding=1),
        BN("stem.bn", 8),
        Act("gelu"),
        GlobalPool(),
        Flatten(),
        LayerNorm("pre_norm", 8),
        Scale("", 8, "head_gamma"),
        Rep(
            (
                (BN("head.bn", 8, dims=1), Linear("head.l", 8, 5)),
                (BN("head_dist.bn", 8, dims=1), Linear("head_dist.l", 8, 5)),
            ),
            Linear("head.fused", 8, 5),
            coefficients=(0.5, 0.5),
        ),
    ),
)

BLOCKS = [REPMIXER, UNIREPLK, ATTENTION]
INPUT_CHANNELS = {"RepMixerTest": 4, "UniRepLKNetBlockTest": 4, "AttentionTest": 8, "HeadsTest": 3}
DESCRIPTIONS: list[Description] = [*BLOCKS, HEADS]


def _input(desc: Description, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, INPUT_CHANNELS[desc.kind], 6, 7)).astype(np.float32)


def _state(desc: Description) -> dict[str, np.ndarray]:
    return random_params(schema_of(desc), seed=7)


def _native_shapes(module: bf.RepModule) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.get_value().shape) for k, v in variables(module).items()}


def _expected_shapes(desc: Description) -> dict[str, tuple[int, ...]]:
    return {flax_key(k, i): to_flax(np.zeros(i.shape, np.float32), i).shape for k, i in schema_of(desc).items()}


def _eager(module: bf.RepModule, x: np.ndarray) -> np.ndarray:
    """The module called directly (no jit) in inference mode, NCHW in, NCHW / logits out."""
    y = bf.inference_view(module)(jnp.asarray(x.transpose(0, 2, 3, 1)))
    return np.asarray(y.transpose(0, 3, 1, 2) if y.ndim == 4 else y)


@pytest.mark.parametrize("desc", DESCRIPTIONS, ids=[d.kind for d in DESCRIPTIONS])
def test_train_and_deploy_match_the_oracle(desc: Description) -> None:
    params, x = _state(desc), _input(desc)
    module = bf.load_state(bf.empty_block(desc), params)
    assert type(module) is bf.block_class(desc.kind)
    assert list(bf.export_state(module)) == list(schema_of(desc))
    assert _native_shapes(module) == _expected_shapes(desc)
    expected = oracle.forward(desc, params, x, "train")
    for y in (bf.predict(module, x), _eager(module, x)):  # jit (per segment) and eager
        assert y.shape == expected.shape
        assert rel_err(y, expected) <= BLOCK_RTOL

    deploy = bf.reparameterize(module)
    assert deploy.deploy and type(deploy) is type(module)
    assert _native_shapes(deploy) == _expected_shapes(in_form(desc, "deploy"))
    ref = reparameterize_state(desc, params)
    got = bf.export_state(deploy)
    assert list(got) == list(ref) == list(schema_of(in_form(desc, "deploy")))
    for k, v in ref.items():
        assert np.abs(got[k] - v).max() <= FUSE_RTOL * max(np.abs(v).max(), 1e-12), k
    for y in (bf.predict(deploy, x), _eager(deploy, x)):
        assert rel_err(y, expected) <= BLOCK_RTOL
    assert rel_err(oracle.forward(desc, ref, x, "deploy"), expected) <= BLOCK_RTOL
    for k, v in bf.export_state(module).items():  # the train form is untouched, bit-exact
        np.testing.assert_array_equal(v, params[k], err_msg=k)


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("desc", DESCRIPTIONS, ids=[d.kind for d in DESCRIPTIONS])
def test_load_export_round_trip(desc: Description, deploy: bool) -> None:
    """Neutral state in and out bit-exact in both forms, keys in schema order; the native
    state (Flax keys) loads back too."""
    form_desc = in_form(desc, "deploy" if deploy else "train")
    params = random_params(schema_of(form_desc), seed=11)
    module = bf.load_state(bf.empty_block(desc, deploy=deploy), params)
    out = bf.export_state(module)
    assert list(out) == list(schema_of(form_desc))
    for k, v in params.items():
        assert out[k].shape == v.shape, k
        np.testing.assert_array_equal(out[k], v, err_msg=k)
    again = bf.load_native_state(bf.empty_block(desc, deploy=deploy), native_state(module))
    for k, v in bf.export_state(again).items():
        np.testing.assert_array_equal(v, params[k], err_msg=k)


def test_parameters_on_the_block_itself() -> None:
    """A Scale with no name is a parameter of the block module (`gamma`, `layer_scale`), in its
    official stored shape; a Bias in a Rep branch lives at its owner's path (`act.1.beta`)."""
    mixer = bf.build_block(REPMIXER)
    scale = vars(mixer)["layer_scale"]
    assert isinstance(scale, nnx.Param) and scale.get_value().shape == (4, 1, 1)
    block = bf.build_block(UNIREPLK)
    gamma = vars(block)["gamma"]
    assert isinstance(gamma, nnx.Param) and gamma.get_value().shape == (4,)
    assert "act.1.beta" in variables(block) and variables(block)["act.1.beta"].get_value().shape == (1, 1, 1, 16)
    assert "act.1.beta" not in variables(bf.reparameterize(block))


def test_gradients_reach_every_parameter() -> None:
    """Training mode (BN batch statistics, over N for the BN1d heads): gradients reach every
    parameter, the model-level `head_gamma` included."""
    model = bf.load_state(bf.empty_block(HEADS), _state(HEADS))
    xh = jnp.asarray(_input(HEADS).transpose(0, 2, 3, 1))

    def loss(m: bf.RepModule) -> jax.Array:
        return jnp.sum(m(xh) ** 2)

    grads = nnx.grad(loss)(model)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    params = {k for k, v in variables(model, (nnx.Param,)).items()}
    assert set(flat) == params and {"head_gamma", "pre_norm.scale", "head.l.kernel"} <= params
    assert all(np.isfinite(v).all() and np.abs(v).max() > 0 for v in flat.values())


def test_bn_over_n_by_c_in_training_mode() -> None:
    """BN1d in training mode: normalises with the biased batch variance over N and keeps the
    unbiased one in its running statistics with torch's momentum 0.1."""
    desc = Block("", "BN1dTest", (Flatten(), BN("bn", 5, dims=1)))
    params = random_params(schema_of(desc), seed=2)
    block = bf.load_state(bf.empty_block(desc), params)
    x = np.random.default_rng(3).standard_normal((6, 1, 1, 5)).astype(np.float32)  # NHWC
    y = np.asarray(block(jnp.asarray(x)))
    f = x.reshape(6, 5).astype(np.float64)
    z = (f - f.mean(0)) / np.sqrt(f.var(0) + 1e-5) * params["bn.weight"] + params["bn.bias"]
    assert rel_err(y, z) <= BLOCK_RTOL
    out = bf.export_state(block)
    mean = 0.9 * params["bn.running_mean"] + 0.1 * f.mean(0)
    var = 0.9 * params["bn.running_var"] + 0.1 * f.var(0, ddof=1)
    np.testing.assert_allclose(out["bn.running_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["bn.running_var"], var, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(bf, "export_stablehlo"), reason="no StableHLO export")
def test_stablehlo_export_of_a_block(tmp_path) -> None:
    params, x = _state(UNIREPLK), _input(UNIREPLK)
    block = bf.load_state(bf.empty_block(UNIREPLK), params)
    fn = bf.load_stablehlo(bf.export_stablehlo(block, tmp_path / "unireplk.bin", x.shape))
    assert rel_err(fn(x), oracle.forward(UNIREPLK, params, x, "train")) <= BLOCK_RTOL
