"""FastViT (apple/ml-fastvit) as data: official key names checked by hand against the official
code, timm's models (random weights, nothing downloaded) against the float64 oracle in both
forms through the timm key map, the key map both ways over every variant's schema, parameter
counts against timm's models, and the official RepMixer / ReparamLargeKernelConv / RepCPE /
fastvit.MobileOneBlock constructors."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from reparam_core import SpecError, block_schema, count_params, get_spec, official_block, reparameterize_state
from reparam_core.blocks.oracle import forward
from reparam_core.blocks.schema import state_schema
from reparam_core.families.official import official_signature
from reparam_core.weights.keymaps import from_canonical, map_key, schemes_for, to_canonical

BN = ("weight", "bias", "running_mean", "running_var")
VARIANTS = ("T8", "T12", "S12", "SA12", "SA24", "SA36", "MA36")
REL = 1e-5


def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{f}": (c,) for f in BN}


def conv_bn(prefix: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.conv.weight": shape, **bn(f"{prefix}.bn", shape[0])}


def shapes(spec, form: str, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k: t.shape for k, t in state_schema(spec, form).items() if k.startswith(prefix + ".")}


# ----------------------------------------------------------------------------- official names
# From apple/ml-fastvit models/fastvit.py and models/modules/{mobileone,replknet}.py, by hand.
# SA12: layers (2, 2, 6, 2), widths 64, 128, 256, 512, mlp ratio 4; network = [stage 0 blocks,
# PatchEmbed 64->128, stage 1, PatchEmbed, stage 2, PatchEmbed 256->512, RepCPE, stage 3 (attention)].

SA12_REPMIXER_BLOCK = {  # network.0.0: RepMixerBlock(64, kernel 3, mlp_ratio 4)
    **bn("network.0.0.token_mixer.mixer.rbr_skip", 64),
    **conv_bn("network.0.0.token_mixer.mixer.rbr_conv.0", (64, 1, 3, 3)),
    **conv_bn("network.0.0.token_mixer.mixer.rbr_scale", (64, 1, 1, 1)),
    **bn("network.0.0.token_mixer.norm.rbr_skip", 64),
    "network.0.0.token_mixer.layer_scale": (64, 1, 1),
    **conv_bn("network.0.0.convffn.conv", (64, 1, 7, 7)),
    "network.0.0.convffn.fc1.weight": (256, 64, 1, 1),
    "network.0.0.convffn.fc1.bias": (256,),
    "network.0.0.convffn.fc2.weight": (64, 256, 1, 1),
    "network.0.0.convffn.fc2.bias": (64,),
    "network.0.0.layer_scale": (64, 1, 1),
}
SA12_PATCH_EMBED = {  # network.5: PatchEmbed(7, 2, 256, 512): groups = in_channels = 256
    **conv_bn("network.5.proj.0.lkb_origin", (512, 1, 7, 7)),
    **conv_bn("network.5.proj.0.small_conv", (512, 1, 3, 3)),
    **bn("network.5.proj.1.rbr_skip", 512),
    **conv_bn("network.5.proj.1.rbr_conv.0", (512, 512, 1, 1)),
}
SA12_ATTENTION_BLOCK = {  # network.7.1: AttentionBlock(512): BN, MHSA (16 heads, qkv without bias)
    **bn("network.7.1.norm", 512),
    "network.7.1.token_mixer.qkv.weight": (1536, 512),
    "network.7.1.token_mixer.proj.weight": (512, 512),
    "network.7.1.token_mixer.proj.bias": (512,),
    "network.7.1.layer_scale_1": (512, 1, 1),
    **conv_bn("network.7.1.convffn.conv", (512, 1, 7, 7)),
    "network.7.1.convffn.fc1.weight": (2048, 512, 1, 1),
    "network.7.1.convffn.fc1.bias": (2048,),
    "network.7.1.convffn.fc2.weight": (512, 2048, 1, 1),
    "network.7.1.convffn.fc2.bias": (512,),
    "network.7.1.layer_scale_2": (512, 1, 1),
}
SA12_HEAD = {  # conv_exp: MobileOneBlock(512, 1024, 3, groups=512, use_se=True); head Linear
    **conv_bn("conv_exp.rbr_conv.0", (1024, 1, 3, 3)),
    **conv_bn("conv_exp.rbr_scale", (1024, 1, 1, 1)),
    "conv_exp.se.reduce.weight": (64, 1024, 1, 1),
    "conv_exp.se.reduce.bias": (64,),
    "conv_exp.se.expand.weight": (1024, 64, 1, 1),
    "conv_exp.se.expand.bias": (1024,),
}


def test_sa12_keys_are_the_official_ones() -> None:
    spec = get_spec("FastViT-SA12")
    assert shapes(spec, "train", "patch_embed.0") == {
        **conv_bn("patch_embed.0.rbr_conv.0", (64, 3, 3, 3)),
        **conv_bn("patch_embed.0.rbr_scale", (64, 3, 1, 1)),
    }
    assert shapes(spec, "train", "patch_embed.1") == {
        **conv_bn("patch_embed.1.rbr_conv.0", (64, 1, 3, 3)),
        **conv_bn("patch_embed.1.rbr_scale", (64, 1, 1, 1)),
    }
    assert shapes(spec, "train", "patch_embed.2") == {
        **bn("patch_embed.2.rbr_skip", 64),
        **conv_bn("patch_embed.2.rbr_conv.0", (64, 64, 1, 1)),
    }
    assert shapes(spec, "train", "network.0.0") == SA12_REPMIXER_BLOCK
    assert shapes(spec, "train", "network.5") == SA12_PATCH_EMBED
    assert shapes(spec, "train", "network.6") == {"network.6.pe.weight": (512, 1, 7, 7), "network.6.pe.bias": (512,)}
    assert shapes(spec, "train", "network.7.1") == SA12_ATTENTION_BLOCK
    assert shapes(spec, "train", "conv_exp") == SA12_HEAD
    train = state_schema(spec, "train")
    assert train["head.weight"].shape == (1000, 1024)
    entries = {k.split(".")[1] for k in train if k.startswith("network.")}
    assert entries == {str(n) for n in range(8)}
    assert {k.split(".")[2] for k in train if k.startswith("network.4.")} == {str(j) for j in range(6)}


def test_sa12_deploy_keys_are_the_official_inference_ones() -> None:
    spec = get_spec("FastViT-SA12")
    assert {k: v for k, v in shapes(spec, "deploy", "network.0.0").items() if "token_mixer" in k} == {
        "network.0.0.token_mixer.reparam_conv.weight": (64, 1, 3, 3),
        "network.0.0.token_mixer.reparam_conv.bias": (64,),
    }
    assert "network.0.0.layer_scale" in state_schema(spec, "deploy")  # the block's own layer scale stays
    assert "network.0.0.convffn.conv.bn.running_var" in state_schema(spec, "deploy")  # ConvFFN keeps its BN
    assert shapes(spec, "deploy", "network.5") == {
        "network.5.proj.0.lkb_reparam.weight": (512, 1, 7, 7),
        "network.5.proj.0.lkb_reparam.bias": (512,),
        "network.5.proj.1.reparam_conv.weight": (512, 512, 1, 1),
        "network.5.proj.1.reparam_conv.bias": (512,),
    }
    assert shapes(spec, "deploy", "network.6") == {
        "network.6.reparam_conv.weight": (512, 1, 7, 7),
        "network.6.reparam_conv.bias": (512,),
    }
    assert shapes(spec, "deploy", "network.7.1") == SA12_ATTENTION_BLOCK  # nothing to fuse in attention blocks


def test_t8_has_no_positional_encoding_and_a_flat_network_of_seven() -> None:
    train = state_schema(get_spec("FastViT-T8"), "train")
    assert {k.split(".")[1] for k in train if k.startswith("network.")} == {str(n) for n in range(7)}
    assert not any(".pe." in k or "token_mixer.qkv" in k for k in train)
    assert train["network.6.1.token_mixer.mixer.rbr_conv.0.conv.weight"].shape == (384, 1, 3, 3)
    assert train["network.6.1.convffn.fc1.weight"].shape == (1152, 384, 1, 1)  # mlp ratio 3
    assert train["conv_exp.se.reduce.weight"].shape == (48, 768, 1, 1)


def test_registry_names_and_timm_aliases() -> None:
    for v in VARIANTS:
        assert get_spec(f"fastvit_{v.lower()}").name == f"FastViT-{v}"
        assert get_spec(f"FASTVIT-{v}", 7).num_classes == 7


# ----------------------------------------------------------------------------- parameter counts
# timm 1.0.31 `fastvit_*` (num_classes=1000): parameters of the model as created (train form) and
# after timm.utils.reparameterize_model (deploy form), measured. The paper's table (FastViT-T8
# 3.6M, ...) counts fewer: see the family's report, not asserted here.
TIMM_PARAMS = {
    "T8": (4026232, 3996040),
    "T12": (7553704, 7508840),
    "S12": (9473576, 9428712),
    "SA12": (11580968, 11545320),
    "SA24": (21554216, 21501288),
    "SA36": (31527464, 31457256),
    "MA36": (44068004, 43984632),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_equal_timm(variant: str) -> None:
    spec = get_spec(f"FastViT-{variant}")
    assert (count_params(spec, "train"), count_params(spec, "deploy")) == TIMM_PARAMS[variant]


# ----------------------------------------------------------------------------- timm key map
# timm fastvit.py names, written by hand from its modules (stages.{i}.downsample / pos_emb /
# blocks.{j}, stem, final_conv, head.fc; conv_kxk, conv_scale, identity, se.fc1/fc2, large_conv,
# mlp, LayerScale2d `gamma`).
TIMM_SA12 = [
    ("stem.0.conv_kxk.0.conv.weight", "patch_embed.0.rbr_conv.0.conv.weight"),
    ("stem.2.identity.running_var", "patch_embed.2.rbr_skip.running_var"),
    ("stem.1.reparam_conv.bias", "patch_embed.1.reparam_conv.bias"),
    ("stages.0.blocks.1.token_mixer.mixer.conv_scale.bn.weight", "network.0.1.token_mixer.mixer.rbr_scale.bn.weight"),
    ("stages.0.blocks.0.token_mixer.norm.identity.bias", "network.0.0.token_mixer.norm.rbr_skip.bias"),
    ("stages.0.blocks.0.token_mixer.layer_scale.gamma", "network.0.0.token_mixer.layer_scale"),
    ("stages.0.blocks.0.token_mixer.reparam_conv.weight", "network.0.0.token_mixer.reparam_conv.weight"),
    ("stages.0.blocks.0.layer_scale.gamma", "network.0.0.layer_scale"),
    ("stages.1.downsample.proj.0.large_conv.conv.weight", "network.1.proj.0.lkb_origin.conv.weight"),
    ("stages.1.downsample.proj.0.small_conv.bn.bias", "network.1.proj.0.small_conv.bn.bias"),
    ("stages.1.downsample.proj.0.reparam_conv.weight", "network.1.proj.0.lkb_reparam.weight"),
    ("stages.1.downsample.proj.1.reparam_conv.weight", "network.1.proj.1.reparam_conv.weight"),
    ("stages.2.blocks.5.mlp.conv.conv.weight", "network.4.5.convffn.conv.conv.weight"),
    ("stages.2.blocks.5.mlp.fc2.bias", "network.4.5.convffn.fc2.bias"),
    ("stages.3.downsample.proj.1.conv_kxk.0.bn.running_mean", "network.5.proj.1.rbr_conv.0.bn.running_mean"),
    ("stages.3.pos_emb.pos_enc.weight", "network.6.pe.weight"),
    ("stages.3.pos_emb.reparam_conv.bias", "network.6.reparam_conv.bias"),
    ("stages.3.blocks.0.norm.weight", "network.7.0.norm.weight"),
    ("stages.3.blocks.0.token_mixer.qkv.weight", "network.7.0.token_mixer.qkv.weight"),
    ("stages.3.blocks.1.layer_scale_1.gamma", "network.7.1.layer_scale_1"),
    ("stages.3.blocks.1.layer_scale_2.gamma", "network.7.1.layer_scale_2"),
    ("final_conv.se.fc1.weight", "conv_exp.se.reduce.weight"),
    ("final_conv.se.fc2.bias", "conv_exp.se.expand.bias"),
    ("final_conv.conv_scale.conv.weight", "conv_exp.rbr_scale.conv.weight"),
    ("head.fc.weight", "head.weight"),
]


def test_timm_names_map_both_ways() -> None:
    rules = schemes_for(get_spec("FastViT-SA12"))["timm"]
    for foreign, canonical in TIMM_SA12:
        assert map_key(foreign, rules) == canonical
        assert map_key(canonical, rules, reverse=True) == foreign
    t8 = schemes_for(get_spec("FastViT-T8"))["timm"]  # no RepCPE: stage 3's blocks are network.6
    assert map_key("stages.3.blocks.1.layer_scale.gamma", t8) == "network.6.1.layer_scale"
    assert map_key("network.6.1.convffn.fc1.weight", t8, reverse=True) == "stages.3.blocks.1.mlp.fc1.weight"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_timm_round_trip_over_the_schema(variant: str, form: str) -> None:
    spec = get_spec(f"FastViT-{variant}")
    state = {k: np.zeros(0) for k in state_schema(spec, form)}
    foreign = from_canonical(state, spec, "timm")
    assert len(foreign) == len(state)
    assert not set(foreign) & set(state)  # every key is renamed, the head's too
    back, found = to_canonical(foreign, spec)
    assert found == "timm"
    assert list(back) == list(state)


# ----------------------------------------------------------------------------- against timm


@pytest.fixture(scope="module")
def timm(request: pytest.FixtureRequest) -> ModuleType:
    from backends.torch import zoo

    try:
        return zoo.import_timm()
    except ImportError as e:
        from parity_tests.backend_rule import missing_backend

        missing_backend(request.config, f"timm cannot be imported through backends.torch.zoo: {e}")
        raise


def _randomized(timm: ModuleType, name: str):
    """timm's model with 10 classes, BN statistics and affine parameters and every layer scale
    drawn at random (the defaults make BN and the 1e-5 layer scales near identities), in eval mode."""
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        for key, p in model.named_parameters():
            if key.endswith("gamma"):
                p.copy_(0.25 + 0.5 * torch.rand(p.shape, generator=g))
    return model


def _state(model) -> dict[str, np.ndarray]:
    return {
        k: v.detach().numpy().copy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("variant", ["t8", "sa12"])
def test_oracle_equals_timm_in_both_forms(timm: ModuleType, variant: str) -> None:
    import torch

    model = _randomized(timm, f"fastvit_{variant}")
    spec = get_spec(f"fastvit_{variant}", 10)
    state, found = to_canonical(_state(model), spec)
    assert found == "timm"
    assert set(state) == set(state_schema(spec, "train"))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x).double().numpy()
    train = forward(spec, state, x.numpy(), "train")
    assert _rel(train, expected) < REL

    deployed = timm.utils.reparameterize_model(model)
    with torch.no_grad():
        expected_deploy = deployed(x).double().numpy()
    fused = reparameterize_state(spec, state)
    timm_fused, found = to_canonical(_state(deployed), spec)
    assert found == "timm"
    assert set(timm_fused) == set(fused) == set(state_schema(spec, "deploy"))
    assert _rel(forward(spec, fused, x.numpy(), "deploy"), expected_deploy) < REL
    assert _rel(forward(spec, timm_fused, x.numpy(), "deploy"), expected_deploy) < REL


# ----------------------------------------------------------------------------- official constructors


def test_official_signatures_are_the_official_ones() -> None:
    assert list(official_signature("RepMixer").parameters) == [
        "dim",
        "kernel_size",
        "use_layer_scale",
        "layer_scale_init_value",
        "inference_mode",
    ]
    assert list(official_signature("ReparamLargeKernelConv").parameters) == [
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "groups",
        "small_kernel",
        "inference_mode",
    ]
    assert list(official_signature("RepCPE").parameters) == [
        "in_channels",
        "embed_dim",
        "spatial_shape",
        "inference_mode",
    ]
    assert list(official_signature("fastvit.MobileOneBlock").parameters) == [
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "inference_mode",
        "use_se",
        "use_act",
        "use_scale_branch",
        "num_conv_branches",
    ]
    assert "use_act" not in official_signature("MobileOneBlock").parameters  # apple/ml-mobileone's class


def test_official_blocks_are_the_blocks_of_the_model() -> None:
    spec = get_spec("FastViT-SA12")
    mixer = official_block("RepMixer", 64)
    assert {k: t.shape for k, t in block_schema(mixer, "train").items()} == {
        k.removeprefix("network.0.0.token_mixer."): v for k, v in SA12_REPMIXER_BLOCK.items() if "token_mixer" in k
    }
    assert {
        k: t.shape for k, t in block_schema(official_block("RepMixer", 64, inference_mode=True), "train").items()
    } == {
        "reparam_conv.weight": (64, 1, 3, 3),
        "reparam_conv.bias": (64,),
    }
    lk = official_block("ReparamLargeKernelConv", 256, 512, 7, 2, 256, 3)
    assert {k: t.shape for k, t in block_schema(lk, "train").items()} == {
        k.removeprefix("network.5.proj.0."): v for k, v in SA12_PATCH_EMBED.items() if "proj.0" in k
    }
    cpe = official_block("RepCPE", 512, 512, spatial_shape=7)
    assert {k: t.shape for k, t in block_schema(cpe, "train").items()} == {
        "pe.weight": (512, 1, 7, 7),
        "pe.bias": (512,),
    }
    exp = official_block("fastvit.MobileOneBlock", 512, 1024, 3, padding=1, groups=512, use_se=True)
    assert {k: t.shape for k, t in block_schema(exp, "train").items()} == {
        k.removeprefix("conv_exp."): v for k, v in SA12_HEAD.items()
    }
    desc = spec.describe()
    conv_exp = next(n for n in desc.body if getattr(n, "name", "") == "conv_exp")
    assert exp.describe().body == conv_exp.body
    norm = official_block(
        "fastvit.MobileOneBlock",
        8,
        8,
        3,
        padding=1,
        groups=8,
        use_act=False,
        use_scale_branch=False,
        num_conv_branches=0,
    )
    assert {k: t.shape for k, t in block_schema(norm, "train").items()} == bn("rbr_skip", 8)


@pytest.mark.parametrize(
    "name,args,match",
    [
        ("RepCPE", dict(in_channels=8, embed_dim=16), r"in_channels must equal embed_dim"),
        ("RepCPE", dict(in_channels=8, embed_dim=8, spatial_shape=(7, 5)), r"square and odd"),
        ("RepMixer", dict(dim=8, kernel_size=4), r"odd kernel_size"),
        ("RepMixer", dict(dim=8, use_layer_scale=1), r"use_layer_scale must be a bool"),
        (
            "ReparamLargeKernelConv",
            dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, groups=1, small_kernel=5),
            r"small_kernel must be odd and <= kernel_size 3",
        ),
        (
            "fastvit.MobileOneBlock",
            dict(in_channels=8, out_channels=16, kernel_size=1, num_conv_branches=0),
            r"needs a branch",
        ),
        (
            "fastvit.MobileOneBlock",
            dict(in_channels=8, out_channels=8, kernel_size=3, dilation=2),
            r"dilation must be 1",
        ),
    ],
)
def test_official_constructors_reject_what_the_official_class_cannot_build(name: str, args: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        official_block(name, **args)
