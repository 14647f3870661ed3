"""RepViT (THU-MIG/RepViT) as data: the official configuration rows and key names derived by hand
from the official code, timm's models (random weights, randomised BN statistics) against the
float64 oracle in both forms through the timm key map, the key map both ways, parameter counts
against timm and the published figures, and the official RepVGGDW / RepViTBlock constructors."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from parity_tests.backend_rule import missing_backend
from parity_tests.tolerance import rel_err
from reparam_core import (
    SpecError,
    block_schema,
    count_params,
    get_spec,
    list_models,
    official_block,
    random_state,
    reparameterize_state,
    state_schema,
)
from reparam_core.blocks.oracle import block_forward, forward
from reparam_core.families.official import official_signature
from reparam_core.families.repvit import RepViTSpec, se_channels
from reparam_core.weights.keymaps import from_canonical, map_key, schemes_for, to_canonical

RTOL = 1e-5
BN = ("weight", "bias", "running_mean", "running_var")
MODELS = (
    "RepViT-M0.9",
    "RepViT-M1.0",
    "RepViT-M1.1",
    "RepViT-M1.5",
    "RepViT-M2.3",
    "RepViT-M1",
    "RepViT-M2",
    "RepViT-M3",
)


@pytest.fixture(scope="module")
def timm(pytestconfig: pytest.Config) -> ModuleType:
    from backends.torch import zoo

    try:
        return zoo.import_timm()
    except ImportError as e:
        missing_backend(pytestconfig, f"timm cannot be imported through backends.torch.zoo: {e}")


def _timm_model(timm: ModuleType, name: str, num_classes: int, **kwargs: object):
    """A timm RepViT in eval mode, random weights, every BN's statistics and affine randomised."""
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model


def _numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _x(size: int = 64) -> np.ndarray:
    return np.random.default_rng(2).standard_normal((1, 3, size, size))


# ----------------------------------------------------------------------------- official layout
# From THU-MIG/RepViT model/repvit.py (current: M0.9 ... M2.3; first release 8df4270: M1, M2,
# M3), by hand: the configuration rows (k, t, c, SE, HS, s) of repvit_m0_9, written here as the
# output widths, the SE column and the stride-2 rows; k = 3 and t = 2 in every row.
M0_9_WIDTHS = [48] * 3 + [96] * 4 + [192] * 16 + [384] * 3
M0_9_SE = "100" + "0100" + "0" + "10" * 7 + "0" + "0" + "10"
M0_9_STRIDE2 = {4, 8, 24}  # 1-based row numbers = features indices


def test_registry_names_and_timm_aliases() -> None:
    assert [m for m in list_models() if m.startswith("RepViT")] == list(MODELS)
    for alias, name in [("repvit_m0_9", "RepViT-M0.9"), ("repvit_m1_5", "RepViT-M1.5"), ("repvit_m3", "RepViT-M3")]:
        assert get_spec(alias).name == name
    assert [get_spec(m).legacy for m in MODELS] == [False] * 5 + [True] * 3


def test_official_configuration_rows() -> None:
    rows = get_spec("RepViT-M0.9").cfgs()
    assert [c for _, _, c, *_ in rows] == M0_9_WIDTHS
    assert "".join(str(se) for _, _, _, se, _, _ in rows) == M0_9_SE
    assert {i for i, row in enumerate(rows, 1) if row[5] == 2} == M0_9_STRIDE2
    assert {(k, t) for k, t, *_ in rows} == {(3, 2)}
    # HS column: 0 up to the second stride-2 row (exclusive), 1 from it on (selects GELU anyway).
    assert [hs for *_, hs, _ in rows] == [0] * 7 + [1] * 19
    # block counts of the official lists: 26, 26, 24, 42, 54; legacy 26, 24, 34.
    assert [len(get_spec(m).cfgs()) for m in MODELS] == [26, 26, 24, 42, 54, 26, 24, 34]


def test_official_keys_of_the_model() -> None:
    """Stem `features.0.{0,2}` (Conv2d_BN `c`/`bn`), a stride-1 block with SE, the first
    stride-2 block, the distillation classifier; deploy keys as `replace_batchnorm` leaves them."""
    spec = get_spec("RepViT-M0.9", 10)
    train = {k: t.shape for k, t in state_schema(spec, "train").items()}
    deploy = {k: t.shape for k, t in state_schema(spec, "deploy").items()}
    assert train["features.0.0.c.weight"] == (24, 3, 3, 3)
    assert train["features.0.2.c.weight"] == (48, 24, 3, 3)
    f1 = {k[len("features.1.") :]: v for k, v in train.items() if k.startswith("features.1.")}
    assert f1 == {
        "token_mixer.0.conv.c.weight": (48, 1, 3, 3),
        **{f"token_mixer.0.conv.bn.{f}": (48,) for f in BN},
        "token_mixer.0.conv1.weight": (48, 1, 1, 1),
        "token_mixer.0.conv1.bias": (48,),
        **{f"token_mixer.0.bn.{f}": (48,) for f in BN},
        "token_mixer.1.fc1.weight": (16, 48, 1, 1),
        "token_mixer.1.fc1.bias": (16,),
        "token_mixer.1.fc2.weight": (48, 16, 1, 1),
        "token_mixer.1.fc2.bias": (48,),
        "channel_mixer.m.0.c.weight": (96, 48, 1, 1),
        **{f"channel_mixer.m.0.bn.{f}": (96,) for f in BN},
        "channel_mixer.m.2.c.weight": (48, 96, 1, 1),
        **{f"channel_mixer.m.2.bn.{f}": (48,) for f in BN},
    }
    f4 = [k for k in train if k.startswith("features.4.") and k.endswith("weight") and ".bn." not in k]
    assert f4 == [
        "features.4.token_mixer.0.c.weight",
        "features.4.token_mixer.2.c.weight",
        "features.4.channel_mixer.m.0.c.weight",
        "features.4.channel_mixer.m.2.c.weight",
    ]
    assert [train[k] for k in f4] == [(48, 1, 3, 3), (96, 48, 1, 1), (192, 96, 1, 1), (96, 192, 1, 1)]
    for head in ("classifier.classifier", "classifier.classifier_dist"):
        assert all(train[f"{head}.bn.{f}"] == (384,) for f in BN)
        assert train[f"{head}.l.weight"] == (10, 384) and train[f"{head}.l.bias"] == (10,)
    assert list(deploy)[:4] == ["features.0.0.weight", "features.0.0.bias", "features.0.2.weight", "features.0.2.bias"]
    assert deploy["features.1.token_mixer.0.weight"] == (48, 1, 3, 3)
    assert deploy["features.4.token_mixer.2.weight"] == (96, 48, 1, 1)
    assert deploy["features.26.channel_mixer.m.2.bias"] == (384,)
    assert list(deploy)[-2:] == ["classifier.weight", "classifier.bias"]
    assert deploy["classifier.weight"] == (10, 384)
    # legacy RepVGGDW: conv1 is a Conv2d_BN, no BN after the sum
    legacy = state_schema(get_spec("RepViT-M1", 10), "train")
    assert "features.1.token_mixer.0.conv1.c.weight" in legacy and "features.1.token_mixer.0.conv1.bn.weight" in legacy
    assert "features.1.token_mixer.0.bn.weight" not in legacy and "features.1.token_mixer.0.conv1.bias" not in legacy


def test_se_width_is_timms(timm: ModuleType) -> None:
    """The official SE is timm's SqueezeExcite(C, 0.25): fc1 C -> make_divisible(C / 4, 8)."""
    for c in (40, 48, 56, 64, 80, 96, 112, 160, 192, 224, 256, 320, 384, 448, 512, 640):
        se = timm.layers.SqueezeExcite(c, 0.25)
        assert (se.fc1.out_channels, se.fc2.in_channels) == (se_channels(c), se_channels(c)), c
        assert [n for n, p in se.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


# ----------------------------------------------------------------------------- against timm


@pytest.mark.parametrize("name,distillation", [("repvit_m0_9", True), ("repvit_m1", True), ("repvit_m0_9", False)])
def test_timm_train_and_deploy_match_the_oracle(timm: ModuleType, name: str, distillation: bool) -> None:
    """timm's eval output == the oracle on its state mapped to official names (train form), and
    timm's reparameterize_model output == the oracle's deploy form on reparameterize_state,
    whose tensors are timm's fused ones under the official names."""
    import torch

    model = _timm_model(timm, name, 10, distillation=distillation)
    spec = get_spec(name, 10)
    if not distillation:
        spec = RepViTSpec(spec.name, spec.widths, spec.depths, spec.legacy, False, 10)
    state, scheme = to_canonical(_numpy_state(model), spec)
    schema = state_schema(spec, "train")
    assert scheme == "timm"
    assert set(state) == set(schema)
    assert all(state[k].shape == t.shape for k, t in schema.items())
    x = _x()
    with torch.no_grad():
        ref = model(torch.from_numpy(x).float()).double().numpy()
    assert rel_err(forward(spec, state, x, "train"), ref) < RTOL

    fused_model = timm.utils.reparameterize_model(model)
    fused, scheme = to_canonical(_numpy_state(fused_model), spec)
    deploy_schema = state_schema(spec, "deploy")
    assert scheme == "timm" and set(fused) == set(deploy_schema)
    ours = reparameterize_state(spec, state)
    assert all(ours[k].shape == t.shape == fused[k].shape for k, t in deploy_schema.items())
    assert max(rel_err(ours[k], fused[k]) for k in deploy_schema) < RTOL
    with torch.no_grad():
        ref_deploy = fused_model(torch.from_numpy(x).float()).double().numpy()
    assert rel_err(forward(spec, ours, x, "deploy"), ref_deploy) < RTOL


# ----------------------------------------------------------------------------- key map

TIMM_NAMES = {  # RepViT-M0.9 (depths 2, 2, 14, 2), official -> timm, by hand
    "features.0.0.c.weight": "stem.conv1.c.weight",
    "features.0.2.bn.running_var": "stem.conv2.bn.running_var",
    "features.1.token_mixer.0.conv.c.weight": "stages.0.blocks.0.token_mixer.conv.c.weight",
    "features.1.token_mixer.0.conv1.bias": "stages.0.blocks.0.token_mixer.conv1.bias",
    "features.1.token_mixer.0.bn.weight": "stages.0.blocks.0.token_mixer.bn.weight",
    "features.1.token_mixer.1.fc2.weight": "stages.0.blocks.0.se.fc2.weight",
    "features.2.channel_mixer.m.2.bn.bias": "stages.0.blocks.1.channel_mixer.conv2.bn.bias",
    "features.3.token_mixer.0.conv.bn.weight": "stages.1.downsample.pre_block.token_mixer.conv.bn.weight",
    "features.4.token_mixer.0.c.weight": "stages.1.downsample.spatial_downsample.c.weight",
    "features.4.token_mixer.2.bn.weight": "stages.1.downsample.channel_downsample.bn.weight",
    "features.4.channel_mixer.m.0.c.weight": "stages.1.downsample.ffn.conv1.c.weight",
    "features.5.token_mixer.1.fc1.bias": "stages.1.blocks.0.se.fc1.bias",
    "features.7.channel_mixer.m.0.c.weight": "stages.2.downsample.pre_block.channel_mixer.conv1.c.weight",
    "features.9.token_mixer.0.bn.bias": "stages.2.blocks.0.token_mixer.bn.bias",
    "features.22.token_mixer.0.bn.bias": "stages.2.blocks.13.token_mixer.bn.bias",
    "features.24.channel_mixer.m.2.c.weight": "stages.3.downsample.ffn.conv2.c.weight",
    "features.26.token_mixer.0.conv.c.weight": "stages.3.blocks.1.token_mixer.conv.c.weight",
    "classifier.classifier.bn.weight": "head.head.bn.weight",
    "classifier.classifier_dist.l.bias": "head.head_dist.l.bias",
    # deploy form
    "features.0.0.weight": "stem.conv1.weight",
    "features.1.token_mixer.0.weight": "stages.0.blocks.0.token_mixer.weight",
    "features.4.token_mixer.0.bias": "stages.1.downsample.spatial_downsample.bias",
    "features.8.channel_mixer.m.0.weight": "stages.2.downsample.ffn.conv1.weight",
    "classifier.weight": "head.weight",
}


def test_timm_names_by_hand() -> None:
    rules = schemes_for(get_spec("RepViT-M0.9"))["timm"]
    for official, name in TIMM_NAMES.items():
        assert map_key(official, rules, reverse=True) == name
        assert map_key(name, rules) == official


@pytest.mark.parametrize("model", MODELS)
def test_key_map_round_trips(model: str) -> None:
    """canonical -> timm -> canonical is the identity on both forms' keys, timm names distinct."""
    spec = get_spec(model)
    assert list(schemes_for(spec)) == ["canonical", "timm"]
    for form in ("train", "deploy"):
        keys = {k: np.empty(0) for k in state_schema(spec, form)}
        foreign = from_canonical(keys, spec, "timm")
        assert len(foreign) == len(keys)
        assert all(k.startswith(("stem.", "stages.", "head.")) for k in foreign)
        back, scheme = to_canonical(foreign, spec)
        assert scheme == "timm" and list(back) == list(keys)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("model,published", [("RepViT-M0.9", 5.1), ("RepViT-M1.5", 14.0)])
def test_param_counts_against_timm_and_the_paper(timm: ModuleType, model: str, published: float) -> None:
    """Train form == timm's parameter count (1000 classes); the published figure is the deploy
    form's (every Conv2d_BN, RepVGGDW and the two heads fused), == timm's fused model."""
    spec = get_spec(model)
    net = timm.create_model(spec.name.replace("RepViT-M", "repvit_m").replace(".", "_"))
    assert count_params(spec, "train") == sum(p.numel() for p in net.parameters())
    fused = timm.utils.reparameterize_model(net)
    assert count_params(spec, "deploy") == sum(p.numel() for p in fused.parameters())
    assert round(count_params(spec, "deploy") / 1e6, 1) == published


def test_published_parameter_counts() -> None:
    """The official README tables (M0.9 ... M2.3 now, M1 / M2 / M3 in the first release), deploy
    form, in millions. The first release's M2 figure, 8.8M, is its train-form count: the same
    network as M1.1 (8.2M) with a 1x1 Conv2d_BN for conv1 and no BN after the sum."""
    published = {"RepViT-M1.0": 6.8, "RepViT-M1.1": 8.2, "RepViT-M2.3": 22.9, "RepViT-M1": 5.1, "RepViT-M3": 10.1}
    for model, millions in published.items():
        assert round(count_params(get_spec(model), "deploy") / 1e6, 1) == millions, model
    assert round(count_params(get_spec("RepViT-M2"), "train") / 1e6, 1) == 8.8
    assert count_params(get_spec("RepViT-M2"), "deploy") == count_params(get_spec("RepViT-M1.1"), "deploy")


# ----------------------------------------------------------------------------- official classes


def test_official_constructors() -> None:
    assert list(official_signature("RepViTBlock").parameters) == [
        "inp",
        "hidden_dim",
        "oup",
        "kernel_size",
        "stride",
        "use_se",
        "use_hs",
    ]
    assert list(official_signature("RepVGGDW").parameters) == ["ed"]
    model = get_spec("RepViT-M0.9")
    blocks = dict(model.blocks())
    assert official_block("RepViTBlock", 48, 96, 48, 3, 1, 1, 0) == blocks["features.1"]
    assert official_block("RepViTBlock", 96, 192, 192, 3, 2, 0, 1) == blocks["features.8"]
    for args in [
        (48, 64, 48, 3, 1, 0, 0),
        (48, 96, 64, 3, 1, 0, 0),
        (48, 96, 64, 3, 3, 0, 0),
        (48, 96, 48, 3, 1, 2, 0),
    ]:
        with pytest.raises(SpecError, match="RepViTBlock"):
            official_block("RepViTBlock", *args)
    with pytest.raises(SpecError, match="RepVGGDW ed"):
        official_block("RepVGGDW", 0)


def test_official_repvgg_dw_is_the_blocks_token_mixer() -> None:
    """RepVGGDW(16): keys relative to it, deploy `weight`/`bias` (what its fuse returns); fused
    from the same tensors it is the stride-1 block's `token_mixer.0`, which is exact."""
    dw = official_block("RepVGGDW", 16)
    assert list(block_schema(dw, "train")) == [
        "conv.c.weight",
        *[f"conv.bn.{f}" for f in BN],
        "conv1.weight",
        "conv1.bias",
        *[f"bn.{f}" for f in BN],
    ]
    assert list(block_schema(dw, "deploy")) == ["weight", "bias"]
    block = official_block("RepViTBlock", 16, 32, 16, 3, 1, 1, 0)
    state = random_state(block, "train", seed=3, dtype=np.float64)
    fused = reparameterize_state(block, state)
    prefix = "token_mixer.0."
    mine = reparameterize_state(dw, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    assert np.array_equal(mine["weight"], fused[prefix + "weight"])
    assert np.array_equal(mine["bias"], fused[prefix + "bias"])
    x = np.random.default_rng(4).standard_normal((2, 16, 8, 8))
    assert rel_err(block_forward(block, fused, x, "deploy"), block_forward(block, state, x, "train")) < 1e-12
