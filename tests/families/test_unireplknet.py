"""UniRepLKNet-A ... T (AILab-CVC/UniRepLKNet) as data: official key names derived by hand from the
official code in both forms (train; deploy = what `reparameterize` leaves, the keys of the
official deploy=True classes), parameter counts from an independent formula and against the
README's table, the official registry's names as aliases, the DilatedReparamBlock table and the
official constructors. The functions of both forms against an independent reference are in
test_reference_unireplknet.py."""

from __future__ import annotations

import inspect

import pytest

from reparam_core import SpecError, block_schema, count_params, get_spec, list_models, official_block, state_schema
from reparam_core.families import unireplknet
from reparam_core.families.official import official_signature
from reparam_core.families.specs import resolve_model_name

BN = ("weight", "bias", "running_mean", "running_var")
Shapes = dict[str, tuple[int, ...]]


def bn(prefix: str, c: int) -> Shapes:
    return {f"{prefix}.{f}": (c,) for f in BN}


def shapes(spec: object, form: str, prefix: str = "") -> Shapes:
    """The schema entries (full keys) of a model under `prefix`, or of a block."""
    schema = state_schema(spec, form) if prefix else block_schema(spec, form)  # type: ignore[arg-type]
    return {k: t.shape for k, t in schema.items() if not prefix or k.startswith(prefix + ".")}


# ----------------------------------------------------------------------------- official names
# From AILab-CVC/UniRepLKNet unireplknet.py, by hand. UniRepLKNetBlock(C, K): `dwconv` (K >= 7: a
# DilatedReparamBlock; K = 3, 5: a depthwise nn.Conv2d with bias=deploy), `norm` BatchNorm2d,
# `se` SEBlock(C, C // 4) with `down` / `up` 1x1 convs with bias, `pwconv1` = Sequential(permute,
# Linear(C, 4C)), `act` = Sequential(GELU, GRNwithNHWC(4C, use_bias=not deploy)) with gamma/beta
# (1, 1, 1, 4C), `pwconv2` = Sequential(Linear(4C, C, bias=False), permute, BatchNorm2d(C)) in
# train form and Sequential(Linear(4C, C), permute) in deploy form, `gamma` (C,) in train form only.
# DilatedReparamBlock(C, 13): lk_origin (bias=deploy), then in train form origin_bn and, for
# (k, r) in (5, 1), (7, 2), (3, 3), (3, 4), (3, 5): dil_conv_k{k}_{r} (C, 1, k, k), dil_bn_k{k}_{r}.


def block_tail(c: int, train: bool) -> Shapes:
    """The keys after dwconv (and norm) of a UniRepLKNetBlock on c channels."""
    out: Shapes = {
        "se.down.weight": (c // 4, c, 1, 1),
        "se.down.bias": (c // 4,),
        "se.up.weight": (c, c // 4, 1, 1),
        "se.up.bias": (c,),
        "pwconv1.1.weight": (4 * c, c),
        "pwconv1.1.bias": (4 * c,),
        "act.1.gamma": (1, 1, 1, 4 * c),
    }
    if train:
        return {
            **out,
            "act.1.beta": (1, 1, 1, 4 * c),
            "pwconv2.0.weight": (c, 4 * c),
            **bn("pwconv2.2", c),
            "gamma": (c,),
        }
    return {**out, "pwconv2.0.weight": (c, 4 * c), "pwconv2.0.bias": (c,)}


def block_13_train(c: int) -> Shapes:
    out: Shapes = {"dwconv.lk_origin.weight": (c, 1, 13, 13), **bn("dwconv.origin_bn", c)}
    for k, r in ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)):
        out |= {f"dwconv.dil_conv_k{k}_{r}.weight": (c, 1, k, k), **bn(f"dwconv.dil_bn_k{k}_{r}", c)}
    return {**out, **bn("norm", c), **block_tail(c, True)}


def block_13_deploy(c: int) -> Shapes:
    return {"dwconv.lk_origin.weight": (c, 1, 13, 13), "dwconv.lk_origin.bias": (c,), **block_tail(c, False)}


def block_3_train(c: int) -> Shapes:
    return {"dwconv.weight": (c, 1, 3, 3), **bn("norm", c), **block_tail(c, True)}


def block_3_deploy(c: int) -> Shapes:
    return {"dwconv.weight": (c, 1, 3, 3), "dwconv.bias": (c,), **block_tail(c, False)}


def prefixed(prefix: str, entries: Shapes) -> Shapes:
    return {f"{prefix}.{k}": v for k, v in entries.items()}


def test_unireplknet_a_keys_are_the_official_ones() -> None:
    spec = get_spec("UniRepLKNet-A")
    assert shapes(spec, "train", "stages.0.1") == prefixed("stages.0.1", block_3_train(40))
    # the official state_dict's order: the block's own `gamma` first, then its modules in forward order
    forward = list(prefixed("stages.0.1", block_3_train(40)))
    assert list(shapes(spec, "train", "stages.0.1")) == [
        "stages.0.1.gamma",
        *(k for k in forward if k != "stages.0.1.gamma"),
    ]
    assert shapes(spec, "deploy", "stages.0.1") == prefixed("stages.0.1", block_3_deploy(40))
    assert shapes(spec, "train", "stages.2.5") == prefixed("stages.2.5", block_13_train(160))
    assert shapes(spec, "deploy", "stages.2.5") == prefixed("stages.2.5", block_13_deploy(160))
    # the stem: Conv2d(3, 20, 3, 2, 1), LayerNorm, GELU, Conv2d(20, 40, 3, 2, 1), LayerNorm
    stem = {
        "downsample_layers.0.0.weight": (20, 3, 3, 3),
        "downsample_layers.0.0.bias": (20,),
        "downsample_layers.0.1.weight": (20,),
        "downsample_layers.0.1.bias": (20,),
        "downsample_layers.0.3.weight": (40, 20, 3, 3),
        "downsample_layers.0.3.bias": (40,),
        "downsample_layers.0.4.weight": (40,),
        "downsample_layers.0.4.bias": (40,),
    }
    down3 = {
        "downsample_layers.3.0.weight": (320, 160, 3, 3),
        "downsample_layers.3.0.bias": (320,),
        "downsample_layers.3.1.weight": (320,),
        "downsample_layers.3.1.bias": (320,),
    }
    head = {"norm.weight": (320,), "norm.bias": (320,), "head.weight": (1000, 320), "head.bias": (1000,)}
    for form in ("train", "deploy"):
        assert shapes(spec, form, "downsample_layers.0") == stem
        assert shapes(spec, form, "downsample_layers.3") == down3
        got = state_schema(spec, form)
        assert {k: got[k].shape for k in head} == head
        blocks = {".".join(k.split(".")[:3]) for k in got if k.startswith("stages.")}
        assert blocks == {f"stages.{i}.{j}" for i, n in enumerate((2, 2, 6, 2)) for j in range(n)}


def test_unireplknet_t_alternates_13_and_3_in_stage_2() -> None:
    spec = get_spec("unireplknet_t")
    deploy = state_schema(spec, "deploy")
    assert {".".join(k.split(".")[:3]) for k in deploy if k.startswith("stages.")} == {
        f"stages.{i}.{j}" for i, n in enumerate((3, 3, 18, 3)) for j in range(n)
    }
    for j in range(18):
        key = f"stages.2.{j}.dwconv.lk_origin.weight" if j % 2 == 0 else f"stages.2.{j}.dwconv.weight"
        assert deploy[key].shape == ((320, 1, 13, 13) if j % 2 == 0 else (320, 1, 3, 3))
    assert shapes(spec, "deploy", "stages.3.2") == prefixed("stages.3.2", block_13_deploy(640))


# ----------------------------------------------------------------------------- parameter counts
# The README's ImageNet-1K table (#params): A 4.4M, F 6.2M, P 10.7M, N 18.3M, T 31M; they are the
# deploy form's counts (the train form has 0.2 to 0.6M more).
README_PARAMS_M = {"A": 4.4, "F": 6.2, "P": 10.7, "N": 18.3, "T": 31.0}
CONFIGS = {  # dims, kernel sizes per stage (the official defaults)
    "A": ((40, 80, 160, 320), ((3, 3), (13,) * 2, (13,) * 6, (13,) * 2)),
    "F": ((48, 96, 192, 384), ((3, 3), (13,) * 2, (13,) * 6, (13,) * 2)),
    "P": ((64, 128, 256, 512), ((3, 3), (13,) * 2, (13,) * 6, (13,) * 2)),
    "N": ((80, 160, 320, 640), ((3, 3), (13,) * 2, (13,) * 8, (13,) * 2)),
    "T": ((80, 160, 320, 640), ((3,) * 3, (13,) * 3, (13, 3) * 9, (13,) * 3)),
}
DILATED_TAPS_13 = 5 * 5 + 7 * 7 + 3 * 3 * 3  # the dilated branches' weights per channel


def block_params(c: int, k: int, form: str) -> int:
    """A UniRepLKNetBlock's parameters, counted by hand (BN running statistics excluded)."""
    deploy = k * k * c + c + (c * (c // 4) + c // 4 + (c // 4) * c + c) + (4 * c * c + 4 * c) + 4 * c + (4 * c * c + c)
    if form == "deploy":
        return deploy
    dilated = (DILATED_TAPS_13 * c + 2 * c * 6) if k == 13 else 0  # five branches + origin_bn
    return deploy - 2 * c + dilated + 2 * c + 4 * c + 2 * c + c  # - biases + norm, beta, BN, gamma


def model_params(dims: tuple[int, ...], kernels: tuple[tuple[int, ...], ...], form: str) -> int:
    h = dims[0] // 2
    total = (3 * h * 9 + h + 2 * h) + (h * dims[0] * 9 + dims[0] + 2 * dims[0])
    total += sum(dims[i - 1] * dims[i] * 9 + 3 * dims[i] for i in range(1, 4))
    total += sum(block_params(c, k, form) for c, ks in zip(dims, kernels) for k in ks)
    return total + 2 * dims[-1] + dims[-1] * 1000 + 1000


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_parameter_counts(variant: str) -> None:
    spec = get_spec(f"UniRepLKNet-{variant}")
    dims, kernels = CONFIGS[variant]
    for form in ("train", "deploy"):
        assert count_params(spec, form) == model_params(dims, kernels, form)
    assert round(count_params(spec, "deploy") / 1e6, 1) == README_PARAMS_M[variant]
    assert count_params(spec, "train") > count_params(spec, "deploy")


def test_registry_names_and_aliases() -> None:
    assert {f"UniRepLKNet-{v}" for v in "AFPNT"} <= set(list_models())
    for v in "afpnt":
        assert resolve_model_name(f"unireplknet_{v}") == f"UniRepLKNet-{v.upper()}"
    assert get_spec("unireplknet_n", num_classes=10).num_classes == 10
    assert unireplknet.KEYMAPS == {}


# ----------------------------------------------------------------------------- official classes

# The official DilatedReparamBlock table: kernel -> (kernel sizes, dilations).
OFFICIAL_TABLE = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


@pytest.mark.parametrize("kernel", sorted(OFFICIAL_TABLE))
def test_dilated_reparam_block_keys(kernel: int) -> None:
    ks, rs = OFFICIAL_TABLE[kernel]
    spec = official_block("DilatedReparamBlock", 8, kernel, False)
    want: Shapes = {"lk_origin.weight": (8, 1, kernel, kernel), **bn("origin_bn", 8)}
    for k, r in zip(ks, rs):
        want |= {f"dil_conv_k{k}_{r}.weight": (8, 1, k, k), **bn(f"dil_bn_k{k}_{r}", 8)}
    assert shapes(spec, "train") == want
    deploy = {"lk_origin.weight": (8, 1, kernel, kernel), "lk_origin.bias": (8,)}
    assert shapes(spec, "deploy") == deploy
    assert shapes(official_block("DilatedReparamBlock", 8, kernel, deploy=True), "train") == deploy


def test_official_unireplknet_block_forms() -> None:
    assert shapes(official_block("UniRepLKNetBlock", 8, 13), "train") == block_13_train(8)
    assert shapes(official_block("UniRepLKNetBlock", 8, 13, deploy=True), "train") == block_13_deploy(8)
    assert shapes(official_block("UniRepLKNetBlock", 8, 3, deploy=True), "train") == block_3_deploy(8)
    assert shapes(official_block("UniRepLKNetBlock", 8, 5), "train")["dwconv.weight"] == (8, 1, 5, 5)
    no_scale = shapes(official_block("UniRepLKNetBlock", 8, 3, layer_scale_init_value=None), "train")
    assert no_scale == {k: v for k, v in block_3_train(8).items() if k != "gamma"}
    assert shapes(official_block("UniRepLKNetBlock", 8, 3, layer_scale_init_value=0), "deploy") == block_3_deploy(8)
    # kernel_size 0: no dwconv and no norm
    none = shapes(official_block("UniRepLKNetBlock", 8, 0), "train")
    assert none == {k: v for k, v in block_3_train(8).items() if not k.startswith(("dwconv", "norm"))}
    wide = shapes(official_block("UniRepLKNetBlock", 8, 7, ffn_factor=2), "deploy")
    assert wide["pwconv1.1.weight"] == (16, 8) and wide["act.1.gamma"] == (1, 1, 1, 16)


def test_official_signatures_follow_the_official_order() -> None:
    assert list(official_signature("DilatedReparamBlock").parameters) == [
        "channels",
        "kernel_size",
        "deploy",
        "use_sync_bn",
        "attempt_use_lk_impl",
    ]
    params = official_signature("UniRepLKNetBlock").parameters
    assert list(params) == [
        "dim",
        "kernel_size",
        "drop_path",
        "layer_scale_init_value",
        "deploy",
        "attempt_use_lk_impl",
        "with_cp",
        "use_sync_bn",
        "ffn_factor",
    ]
    assert params["layer_scale_init_value"].default == 1e-6
    assert params["deploy"].default is False and params["ffn_factor"].default == 4
    assert params["kernel_size"].default is inspect.Parameter.empty


@pytest.mark.parametrize(
    "cls,args,kwargs,value",
    [
        ("DilatedReparamBlock", (8, 3, False), {}, "kernel_size=3"),
        ("DilatedReparamBlock", (8, 13, 1), {}, "deploy=1"),
        ("DilatedReparamBlock", (0, 13, False), {}, "channels=0"),
        ("UniRepLKNetBlock", (8, 4), {}, "kernel_size=4"),
        ("UniRepLKNetBlock", (8, 19), {}, "kernel_size=19"),
        ("UniRepLKNetBlock", (2, 3), {}, "dim=2"),
        ("UniRepLKNetBlock", (8, 3), {"deploy": "yes"}, "deploy='yes'"),
    ],
)
def test_bad_values_are_spec_errors(cls: str, args: tuple[object, ...], kwargs: dict[str, object], value: str) -> None:
    with pytest.raises(SpecError, match=f"{cls}: {value}"):
        official_block(cls, *args, **kwargs)
