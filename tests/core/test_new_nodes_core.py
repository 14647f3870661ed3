"""The core rules of the generic nodes of issue 26 (Bias, pointwise Linear, LayerNorm, GRN,
Attention, BN over N x C, Scale with its official key and shape) and of the new Rep fields
(coefficients, a scale after the BN, a residual, a Linear as the fused module).

Property tests: random such Reps in deploy form (reparameterize_state, then the float64 oracle on
the deploy description) equal the oracle of the train form to 1e-10 in float64; the schema of
both forms is exactly what the oracle reads and what reparameterize_state writes. Also: what
check_rep refuses and why, the counts of a small example by hand, and the JSON round trip of
every new node and field."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reparam_core import FusionError, reparameterize_state
from reparam_core.blocks import fuse
from reparam_core.blocks.counting import count_macs, count_params, node_macs
from reparam_core.blocks.nodes import (
    BN,
    GRN,
    Act,
    Attention,
    AvgPool,
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
    to_deploy,
)
from reparam_core.blocks.nodes_io import description_from_data, description_to_data
from reparam_core.blocks.oracle import forward
from reparam_core.blocks.schema import schema_of
from reparam_core.weights.state import random_tensors

REL = 1e-10


class Reads(Mapping[str, np.ndarray]):
    """A state that records which keys are read."""

    def __init__(self, state: Mapping[str, np.ndarray]) -> None:
        self.state, self.read = state, set[str]()

    def __getitem__(self, key: str) -> np.ndarray:
        self.read.add(key)
        return self.state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def deploy_error(block: Block | Model, x: np.ndarray, seed: int) -> float:
    """max |deploy - train| / max |train| of the float64 oracle; checks on the way that the
    schema of each form is exactly the keys the oracle reads and reparameterize_state writes."""
    train = random_tensors(schema_of(block), seed, np.float64)
    deploy = reparameterize_state(block, train)
    assert list(deploy) == list(schema_of(to_deploy(block)))
    assert all(deploy[k].shape == info.shape for k, info in schema_of(to_deploy(block)).items())
    read_train, read_deploy = Reads(train), Reads(deploy)
    y_train = forward(block, read_train, x, "train")
    y_deploy = forward(block, read_deploy, x, "deploy")
    assert read_train.read == set(train) and read_deploy.read == set(deploy)
    return rel_err(y_deploy, y_train)


def _vector_shape(draw: st.DrawFn, c: int) -> tuple[int, ...] | None:
    return draw(st.sampled_from([None, (c,), (c, 1, 1), (1, 1, 1, c), (1, c, 1, 1)]))


@st.composite
def combined_reps(draw: st.DrawFn) -> tuple[Block, tuple[int, int], int, int]:
    """A Rep with coefficients, a scale after the (optional) BN and a residual, its branches
    conv + BN / Scale / Bias, Bias before a 1x1 conv or Linear, Linear + BN, identities (bare,
    or with a BN or a Bias), average pools; grouped and depthwise."""
    g = draw(st.sampled_from([1, 2, 0]))  # 0 = depthwise
    cin = draw(st.integers(1, 4)) if g == 0 else g * draw(st.integers(1, 2))
    g = g or cin
    big = draw(st.sampled_from([1, 3, 5]))
    pad = (big - 1) // 2
    stride = draw(st.sampled_from([1, 1, 2]))
    cout = cin if stride == 1 and draw(st.booleans()) else g * draw(st.integers(1, 2))
    square = stride == 1 and cin == cout
    kinds = ["conv_bn", "conv_affine", "bias_1x1"]
    kinds += ["linear", "bias_linear"] if g == 1 and stride == 1 else []
    kinds += ["identity", "avgpool"] if square else []
    branches = []
    for i in range(draw(st.integers(1, 4))):
        n, kind = f"b{i}", draw(st.sampled_from(kinds))
        k = draw(st.sampled_from([k for k in (1, 3, 5) if k <= big]))
        conv = Conv(f"{n}.conv", cin, cout, k, stride, pad - (big - k) // 2, groups=g, bias=draw(st.booleans()))
        one = Conv(f"{n}.conv", cin, cout, 1, stride, groups=g, bias=draw(st.booleans()))
        if kind == "conv_bn":
            branches.append((conv, BN(f"{n}.bn", cout)))
        elif kind == "conv_affine":
            branches.append(
                (
                    conv,
                    Scale(f"{n}.ls", cout, "gamma", _vector_shape(draw, cout)),
                    Bias(f"{n}.shift", cout, shape=_vector_shape(draw, cout)),
                )
            )
        elif kind == "bias_1x1":  # a Bias before an unpadded head: W b joins the bias
            branches.append((Bias(f"{n}.pre", cin, "beta", _vector_shape(draw, cin)), one, BN(f"{n}.bn", cout)))
        elif kind == "linear":
            branches.append((Linear(f"{n}.fc", cin, cout, draw(st.booleans())), BN(f"{n}.bn", cout)))
        elif kind == "bias_linear":
            branches.append((Bias(f"{n}.pre", cin), Linear(f"{n}.fc", cin, cout, draw(st.booleans()))))
        elif kind == "identity":
            branches.append(draw(st.sampled_from([(), (BN(f"{n}.bn", cin),), (Bias(f"{n}.b", cin),)])))
        elif big >= 3:
            branches.append((AvgPool(3, stride, 1), BN(f"{n}.bn", cout)))
        else:
            branches.append((BN(f"{n}.bn", cin),))
    coefficients = draw(
        st.one_of(
            st.none(), st.lists(st.sampled_from([1.0, -1.0, 0.5]), min_size=len(branches), max_size=len(branches))
        )
    )
    rep = Rep(
        tuple(branches),
        Conv("fused", cin, cout, big, stride, pad, groups=g),
        bn=BN("post", cout) if draw(st.booleans()) else None,
        coefficients=tuple(coefficients) if coefficients is not None else None,
        scale=Scale("", cout, "layer_scale", _vector_shape(draw, cout)) if draw(st.booleans()) else None,
        residual=square and draw(st.booleans()),
    )
    hw = (draw(st.integers(big, big + 4)), draw(st.integers(big, big + 4)))
    return Block("", "Combined", (rep,)), hw, cin, draw(st.integers(0, 2**16))


@given(combined_reps(), st.sampled_from([None, 7]))
def test_combined_rep_deploy_equals_train(case, chunk) -> None:
    """Coefficients, scale, residual and the new branch primitives, on every chunking."""
    block, hw, cin, seed = case
    x = np.random.default_rng(seed).normal(size=(2, cin, *hw))
    saved = fuse.CHUNK_ELEMENTS
    try:
        if chunk is not None:  # many slices: the row/column-split path of rep_kernel_bias
            fuse.CHUNK_ELEMENTS = chunk
        assert deploy_error(block, x, seed) < REL
    finally:
        fuse.CHUNK_ELEMENTS = saved


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**16))
def test_averaged_linear_heads(n_heads: int, cin: int, cout: int, seed: int) -> None:
    """A classifier's heads (BN over N x C, then a Linear) averaged: a Rep fused into one Linear,
    on N x C."""
    heads = tuple((BN(f"head{i}.bn", cin, dims=1), Linear(f"head{i}.l", cin, cout)) for i in range(n_heads))
    rep = Rep(heads, Linear("head", cin, cout), coefficients=(1.0 / n_heads,) * n_heads)
    model = Model("m", "Heads", (GlobalPool(), Flatten(), rep))
    x = np.random.default_rng(seed).normal(size=(2, cin, 3, 3))
    assert deploy_error(model, x, seed) < REL
    deploy = schema_of(to_deploy(model))
    assert {k: v.shape for k, v in deploy.items()} == {"head.weight": (cout, cin), "head.bias": (cout,)}


@given(st.integers(1, 4), st.integers(1, 3), st.booleans(), st.integers(0, 2**16))
def test_unireplknet_pwconv2_chain(c: int, expand: int, scale_in_branch: bool, seed: int) -> None:
    """UniRepLKNet's block after its depthwise conv: a channels-first LayerNorm, pwconv1
    (Linear), GELU, GRN without beta, then the Rep (GRN's beta as a Bias, pwconv2 without bias,
    BN, layer scale `gamma` (C,)) fused into pwconv2 with a bias; the layer scale either in the
    branch or as the Rep's scale after its BN."""
    h = c * expand
    gamma = Scale("", c, "gamma")
    branch = (Bias("grn", h, "beta", (1, 1, 1, h)), Linear("pwconv2", h, c, bias=False))
    rep = (
        Rep((branch + (BN("norm", c), gamma),), Linear("pwconv2", h, c))
        if scale_in_branch
        else Rep((branch,), Linear("pwconv2", h, c), bn=BN("norm", c), scale=gamma)
    )
    body = (
        LayerNorm("ln", c),
        Linear("pwconv1", c, h),
        Act("gelu"),
        GRN("grn", h, bias=False),
        rep,
    )
    block = Block("", "UniRepLKNetBlock", body)
    x = np.random.default_rng(seed).normal(size=(2, c, 4, 5))
    assert deploy_error(block, x, seed) < REL
    keys = schema_of(to_deploy(block))
    assert list(keys)[-2:] == ["pwconv2.weight", "pwconv2.bias"] and "gamma" not in keys and "grn.beta" not in keys
    assert keys["pwconv2.weight"].shape == (c, h)


@given(st.sampled_from([1, 2, 0]), st.integers(1, 3), st.sampled_from([3, 5]), st.integers(0, 2**16))
def test_repmixer(g: int, per: int, k: int, seed: int) -> None:
    """FastViT's RepMixer x + s (mixer(x) - norm(x)): mixer = dw kxk conv + BN and 1x1 + BN
    branches (+1), norm = its BN branch (-1); layer scale stored (C, 1, 1); grouped too."""
    c = per * (g or 1) if g else per + 1
    groups = g or c
    rep = Rep(
        (
            (Conv("mixer.conv_kxk.0.conv", c, c, k, padding=k // 2, groups=groups), BN("mixer.conv_kxk.0.bn", c)),
            (Conv("mixer.conv_scale.conv", c, c, 1, groups=groups), BN("mixer.conv_scale.bn", c)),
            (BN("mixer.rbr_skip", c),),
            (BN("norm.rbr_skip", c),),
        ),
        Conv("reparam_conv", c, c, k, padding=k // 2, groups=groups),
        coefficients=(1, 1, 1, -1),
        scale=Scale("", c, "layer_scale", (c, 1, 1)),
        residual=True,
    )
    x = np.random.default_rng(seed).normal(size=(1, c, 6, 7))
    assert deploy_error(Block("", "RepMixer", (rep,)), x, seed) < REL


def test_attention_schema_and_counts() -> None:
    """Attention keys and shapes (official FastViT names), its parameters and MACs by hand."""
    att = Attention("token_mixer", 8, 2, qkv_bias=True)
    block = Block("", "AttentionBlock", (att,))
    schema = {k: v.shape for k, v in schema_of(block).items()}
    assert schema == {
        "token_mixer.qkv.weight": (24, 8),
        "token_mixer.qkv.bias": (24,),
        "token_mixer.proj.weight": (8, 8),
        "token_mixer.proj.bias": (8,),
    }
    assert count_params(block, "train") == 24 * 8 + 24 + 64 + 8
    t = 4 * 5
    assert node_macs(att, (8, 4, 5)) == (t * 8 * 24 + 2 * t * t * 8 + t * 8 * 8, (8, 4, 5))
    no_bias = schema_of(Block("", "A", (Attention("a", 8, 2),)))
    assert list(no_bias) == ["a.qkv.weight", "a.proj.weight", "a.proj.bias"]


def test_schema_of_every_new_node() -> None:
    """Keys, shapes and order of every new node; deploy form of a Rep fused into a Linear."""
    block = Block(
        "",
        "All",
        (
            BN("bn1", 4, dims=1),
            Scale("ls", 4, "gamma", (4, 1, 1)),
            Scale("", 4, "gamma"),
            Bias("b", 4, shape=(1, 1, 1, 4)),
            Linear("nobias", 4, 6, bias=False),
            LayerNorm("ln", 6),
            GRN("grn", 6),
            GRN("grn2", 6, bias=False),
            Rep(((Bias("beta", 6), Linear("pw", 6, 4, bias=False)),), Linear("pw", 6, 4), scale=Scale("", 4, "g2")),
        ),
    )
    assert [(k, v.shape) for k, v in schema_of(block).items()] == list(
        {
            "gamma": (4,),
            "g2": (4,),
            "bn1.weight": (4,),
            "bn1.bias": (4,),
            "bn1.running_mean": (4,),
            "bn1.running_var": (4,),
            "ls.gamma": (4, 1, 1),
            "b.bias": (1, 1, 1, 4),
            "nobias.weight": (6, 4),
            "ln.weight": (6,),
            "ln.bias": (6,),
            "grn.gamma": (1, 1, 1, 6),
            "grn.beta": (1, 1, 1, 6),
            "grn2.gamma": (1, 1, 1, 6),
            "beta.bias": (6,),
            "pw.weight": (4, 6),
        }.items()
    )  # in module order: the block's own tensors (gamma, the Rep's scale g2) first, as torch lists them
    kinds = {k: v.kind for k, v in schema_of(block).items()}
    assert kinds["ls.gamma"] == kinds["g2"] == "scale.weight" and kinds["b.bias"] == "bias.bias"
    deploy = {k: v.shape for k, v in schema_of(to_deploy(block)).items()}
    assert list(deploy)[-2:] == ["pw.weight", "pw.bias"] and deploy["pw.weight"] == (4, 6)
    assert "g2" not in deploy and "beta.bias" not in deploy


def test_counts_by_hand() -> None:
    """Parameters and MACs of a small model with the new nodes, on a 3 x 4 x 4 input."""
    model = Model(
        "m",
        "Small",
        (
            Conv("stem", 3, 8, 3, padding=1),  # 16 * 8 * 3 * 9 = 3456 MACs, 216 params
            LayerNorm("ln", 8),  # 16 params, 0 MACs
            Linear("pw1", 8, 16),  # 16 * 8 * 16 = 2048 MACs, 144 params
            Act("gelu"),
            GRN("grn", 16),  # 32 params
            Rep(
                ((Bias("grn.b2", 16), Linear("pw2", 16, 8, bias=False)),),  # 16 + 128 params, 2048 MACs
                Linear("pw2", 16, 8),
                bn=BN("norm", 8),  # 16 learnable params
                scale=Scale("", 8, "gamma"),  # 8 params
            ),
            Attention("attn", 8, 2),  # 192 + 72 params; 16*8*24 + 2*256*8 + 16*64 = 8192 MACs
            GlobalPool(),
            Flatten(),
            BN("head_bn", 8, dims=1),  # 16 params
            Linear("head", 8, 5),  # 45 params, 40 MACs
        ),
    )
    assert count_params(model, "train") == 216 + 16 + 144 + 32 + 16 + 128 + 16 + 8 + 192 + 72 + 16 + 45
    assert count_params(model, "deploy") == 216 + 16 + 144 + 32 + 136 + 192 + 72 + 16 + 45
    assert count_macs(model, "train", 4) == 3456 + 2048 + 2048 + 8192 + 40
    assert count_macs(model, "deploy", 4) == 3456 + 2048 + 2048 + 8192 + 40
    assert node_macs(Linear("l", 8, 16), (8, 3, 5)) == (15 * 128, (16, 3, 5))


def test_counts_and_deploy_of_the_small_model() -> None:
    """The hand-counted model also fuses exactly (LayerNorm, GRN, Attention, BN1d, Linear pass)."""
    model = Model(
        "m",
        "Small",
        (
            Conv("stem", 3, 8, 3, padding=1),
            LayerNorm("ln", 8),
            Linear("pw1", 8, 16),
            Act("gelu"),
            GRN("grn", 16),
            Rep(
                ((Bias("grn.b2", 16), Linear("pw2", 16, 8, bias=False)),),
                Linear("pw2", 16, 8),
                bn=BN("norm", 8),
                scale=Scale("", 8, "gamma"),
            ),
            Attention("attn", 8, 2),
            GlobalPool(),
            Flatten(),
            BN("head_bn", 8, dims=1),
            Linear("head", 8, 5),
        ),
    )
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
    assert deploy_error(model, x, 0) < REL


def test_streaming_with_a_native_layout() -> None:
    """iter_deploy_state with an `empty` that hands out HWIO buffers (as the Flax backend's) and
    releases: a residual, coefficient and scale Rep's kernel comes out equal; a Rep fused into
    a Linear is allocated by the core ((O, I), not the backend's conv layout)."""
    c = 4
    block = Block(
        "",
        "B",
        (
            Rep(
                ((Conv("a", c, c, 3, padding=1, groups=2), BN("a_bn", c)), (Bias("z", c),), ()),
                Conv("f", c, c, 3, padding=1, groups=2),
                coefficients=(0.5, -1.0, 1.0),
                scale=Scale("s", c, shape=(c, 1, 1)),
                residual=True,
            ),
            Rep(((Linear("l", c, 3),),), Linear("l", c, 3), residual=False, coefficients=(2.0,)),
        ),
    )
    train = random_tensors(schema_of(block), 3, np.float64)
    released: list[str] = []

    def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.transpose(np.empty((shape[2], shape[3], shape[1], shape[0]), dtype), (3, 2, 0, 1))

    out = dict(fuse.iter_deploy_state(block, train.__getitem__, released.append, empty))
    assert sorted(released) == sorted(train)
    want = reparameterize_state(block, train)
    assert list(out) == list(want)
    for k in want:
        np.testing.assert_allclose(out[k], want[k], rtol=0, atol=1e-13)
    assert out["f.weight"].strides != want["f.weight"].strides and out["l.weight"].shape == (3, c)


@pytest.mark.parametrize("seed", range(4))
def test_concat_then_bn(seed: int) -> None:
    """A BN after a concatenation folds into each branch's rows."""
    rep = Rep(
        ((Conv("a", 4, 2, 3, padding=1),), (Conv("b", 4, 3, 1, bias=True), BN("b_bn", 3)), (AvgPool(3, 1, 1),)),
        Conv("f", 4, 9, 3, padding=1),
        bn=BN("post", 9),
        combine="concat",
    )
    x = np.random.default_rng(seed).normal(size=(1, 4, 5, 6))
    assert deploy_error(Block("", "Concat", (rep,)), x, seed) < REL


def test_result_dtype_follows_a_linear_weight() -> None:
    rep = Rep(((Bias("b", 4), Linear("l", 4, 2, bias=False)),), Linear("l", 4, 2))
    params = {"b.bias": np.ones(4, np.float64), "l.weight": np.ones((2, 4), np.float32)}
    w, b = fuse.rep_kernel_bias(rep, params)
    assert w.dtype == b.dtype == np.float32 and w.shape == (2, 4)
    np.testing.assert_array_equal(b, np.full(2, 4.0))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda c: dict(coefficients=(1.0,)), "2 branches but 1 coefficients"),
        (lambda c: dict(coefficients=(1.0, float("nan"))), "not a finite number"),
        (lambda c: dict(scale=Scale("s", 3)), "scale 's.weight'.*3 channels"),
        (lambda c: dict(scale=Scale("s", c, shape=(c, 2))), r"stored with shape \(4, 2\)"),
        (lambda c: dict(residual=True, fused=Conv("f", c, c, 3, padding=1, stride=2)), "stride"),
        (lambda c: dict(combine="concat", coefficients=(1.0, 1.0)), "concatenating Rep fused into 'f'.*coefficients"),
        (lambda c: dict(combine="concat", residual=True), "concatenating.*residual=True"),
        (lambda c: dict(combine="concat", scale=Scale("s", 2 * c)), "concatenating.*scale 's.weight'"),
    ],
)
def test_check_rep_refuses_bad_combinations(make, match: str) -> None:
    c = 4
    stride = make(c).get("fused", Conv("f", c, c, 3, padding=1)).stride
    args = {
        "branches": (
            (Conv("a", c, c, 3, padding=1, stride=stride),),
            (Conv("b", c, c, 1, stride=stride),),
        ),
        "fused": Conv("f", c, 2 * c if make(c).get("combine") else c, 3, padding=1),
        **make(c),
    }
    with pytest.raises(FusionError, match=match):
        Rep(**args)


def test_check_rep_refuses_what_a_fused_linear_or_bias_cannot_be() -> None:
    with pytest.raises(FusionError, match="the residual of 'l'.*4 -> 3"):
        Rep(((Linear("l", 4, 3),),), Linear("l", 4, 3), residual=True)
    with pytest.raises(FusionError, match="groups=1, the fused conv groups=2"):
        Rep(((Linear("l", 4, 4),),), Conv("f", 4, 4, 1, groups=2))
    with pytest.raises(
        FusionError, match=r"conv 'c' would pad a biased value with zeros \(the output of Bias 'b.bias'\)"
    ):
        Rep(((Bias("b", 4), Conv("c", 4, 4, 3, padding=1)),), Conv("f", 4, 4, 3, padding=1))
    with pytest.raises(FusionError, match="Bias 'b.bias' is stored with shape"):
        Rep(((Bias("b", 4, shape=(3,)), Conv("c", 4, 4, 1)),), Conv("f", 4, 4, 1))
    with pytest.raises(FusionError, match="Linear 'l' has 3 channels|reads 3 channels"):
        Rep(((Linear("l", 3, 4),),), Linear("f", 4, 4))


def test_every_new_node_and_field_round_trips() -> None:
    """JSON and back: tuples (shapes, coefficients) come back as tuples, floats exactly."""
    block = Block(
        "",
        "AllNew",
        (
            BN("bn1", 4, 1e-3, dims=1),
            Scale("ls", 4, "gamma", (4, 1, 1)),
            Bias("b", 4, "beta", (1, 1, 1, 4)),
            Linear("l", 4, 4, bias=False),
            LayerNorm("ln", 4, 1e-5),
            GRN("grn", 4, bias=False, eps=1e-7),
            Attention("att", 4, 2, qkv_bias=True, qkv="to_qkv", proj="out"),
            Act("gelu"),
            Rep(
                ((Conv("a", 4, 4, 3, padding=1, groups=4), BN("a_bn", 4)), (BN("n", 4),), (Bias("z", 4),)),
                Conv("f", 4, 4, 3, padding=1, groups=4),
                coefficients=(1.0, -1.0, 0.1 + 0.2),
                scale=Scale("", 4, "layer_scale", (4, 1, 1)),
                residual=True,
            ),
            Rep(((BN("h.bn", 4, dims=1), Linear("h.l", 4, 2)),), Linear("h", 4, 2), coefficients=(1 / 3,)),
        ),
    )
    back = description_from_data(json.loads(json.dumps(description_to_data(block))))
    assert back == block
    rep = back.body[-2]
    assert isinstance(rep, Rep) and isinstance(rep.coefficients, tuple) and rep.coefficients[2] == 0.1 + 0.2
    assert isinstance(back.body[1], Scale) and back.body[1].shape == (4, 1, 1)
