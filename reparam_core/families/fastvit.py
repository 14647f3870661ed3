"""FastViT (apple/ml-fastvit) as data: the model spec and its description, the registry entries
`FastViT-T8` ... `FastViT-MA36`, timm's names as a key map, and the official constructors of
`RepMixer`, `ReparamLargeKernelConv`, `RepCPE` and FastViT's own `MobileOneBlock`
(`fastvit.MobileOneBlock`: GELU, `use_act`, `use_scale_branch`; apple/ml-mobileone's class of the
same name is `MobileOneBlock`).

The official model (models/fastvit.py), module names as the official code has them:

- `patch_embed.{0,1,2}`: MobileOne blocks (GELU): 3x3 stride 2 from RGB, depthwise 3x3 stride 2,
  1x1 (each with its rbr_skip / rbr_conv.0 / rbr_scale branches as MobileOneBlock builds them).
- `network.{n}`: one flat list; for stage i: a `RepCPE` when the stage has a positional encoding,
  then the stage's blocks (an nn.Sequential: `network.{n}.{j}`), then, except after the last
  stage, a `PatchEmbed` to the next stage's width (every official variant downsamples).
- RepMixerBlock: `token_mixer` (RepMixer), then x + layer_scale * convffn(x).
  RepMixer: x + layer_scale (mixer(x) - norm(x)), mixer and norm depthwise kxk MobileOne blocks
  without activation; norm has its BN skip branch only (num_conv_branches=0, no scale branch).
  Its deploy form is the depthwise kxk conv `reparam_conv`: a Rep with coefficients +1 on the
  mixer's branches, -1 on the norm's, the layer scale after the sum and the residual.
- AttentionBlock: x + layer_scale_1 * token_mixer(norm(x)) (BatchNorm, MHSA with head_dim 32:
  dim / 32 heads, `qkv` without bias, `proj`), then x + layer_scale_2 * convffn(x).
- ConvFFN `convffn`: depthwise 7x7 conv + BN (`conv.conv`, `conv.bn`, kept in deploy form),
  `fc1` 1x1 conv with bias, GELU, `fc2` 1x1 conv with bias.
- Layer scales are nn.Parameters of shape (C, 1, 1) named `layer_scale`, `layer_scale_1`,
  `layer_scale_2` on their module.
- PatchEmbed `proj.0`: ReparamLargeKernelConv (kxk `lkb_origin.conv`/`.bn` + 3x3
  `small_conv.conv`/`.bn`, stride 2, groups = in_channels; deploy `lkb_reparam`; its activation
  is computed and discarded by the official forward, so none here); `proj.1`: a 1x1 MobileOne
  block (GELU).
- RepCPE: x + pe(x), `pe` a depthwise 7x7 conv with bias; deploy `reparam_conv`.
- Head: `conv_exp` a MobileOne block 3x3 C -> 2C, groups C, with SE (`se.reduce`/`se.expand`,
  hidden int(2C / 16)) and GELU; global average pool, `head` Linear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..blocks.nodes import (
    BN,
    Act,
    Add,
    Attention,
    Block,
    Branch,
    Conv,
    Flatten,
    Geometry,
    GlobalPool,
    Linear,
    Model,
    Node,
    Primitive,
    Rep,
    Scale,
    join_key,
    pair,
    to_deploy,
)
from ..errors import SpecError
from .mobileone import MobileOneBlockSpec
from .official_args import bools, ints

Rules = list[tuple[str, str]]  # reparam_core.weights.keymaps' (foreign, canonical) templates

HEAD_DIM = 32  # the official MHSA's head_dim: heads = dim / 32
Mixer = Literal["repmixer", "attention"]


def _layer_scale(param: str, channels: int) -> Scale:
    """An official layer scale: the nn.Parameter `param` of shape (C, 1, 1) on its module."""
    return Scale("", channels, param, (channels, 1, 1))


def _scoped(branches: tuple[Branch, ...], scope: str) -> tuple[Branch, ...]:
    """Branches of a sub-module, renamed into the scope `scope` of the enclosing block."""

    def rename(p: Primitive) -> Primitive:
        if isinstance(p, (Conv, BN)):  # what a MobileOne branch holds
            return replace(p, name=join_key(scope, p.name))
        raise SpecError(f"a MobileOne branch holds a {type(p).__name__}, expected convs and BNs")

    return tuple(tuple(rename(p) for p in b) for b in branches)


def _branches(spec: MobileOneBlockSpec) -> tuple[Branch, ...]:
    """The branches of a MobileOne block's Rep."""
    return next(n.branches for n in spec.describe().body if isinstance(n, Rep))


def _named(block: Block, name: str) -> Block:
    return replace(block, name=name)


# --------------------------------------------------------------------------- re-parameterizable modules


@dataclass(frozen=True)
class RepMixerSpec:
    """RepMixer: y = x + s (mixer(x) - norm(x)) (s: `layer_scale`, when used), mixer and norm
    depthwise kxk MobileOne blocks without activation; deploy: one depthwise kxk conv."""

    dim: int
    kernel_size: int = 3
    use_layer_scale: bool = True

    kind = "RepMixer"

    def __post_init__(self) -> None:
        if self.dim < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise SpecError(f"RepMixer needs dim >= 1 and an odd kernel_size, got {self.dim}, {self.kernel_size}")

    def describe(self) -> Block:
        c, k = self.dim, self.kernel_size
        mixer = MobileOneBlockSpec(c, c, k, groups=c, act="identity")
        norm = MobileOneBlockSpec(c, c, k, groups=c, act="identity", num_conv_branches=0, use_scale_branch=False)
        plus, minus = _scoped(_branches(mixer), "mixer"), _scoped(_branches(norm), "norm")
        rep = Rep(
            plus + minus,
            Conv("reparam_conv", c, c, k, padding=k // 2, groups=c),
            coefficients=(1.0,) * len(plus) + (-1.0,) * len(minus),
            scale=_layer_scale("layer_scale", c) if self.use_layer_scale else None,
            residual=True,
        )
        return Block("", self.kind, (rep,))


@dataclass(frozen=True)
class ReparamLargeKernelConvSpec:
    """ReparamLargeKernelConv: BN(kxk conv) + BN(small conv), centred, same stride and groups;
    deploy `lkb_reparam`. No activation (the official forward discards it)."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int
    small_kernel: int | None = 3

    kind = "ReparamLargeKernelConv"

    def __post_init__(self) -> None:
        k, s = self.kernel_size, self.small_kernel
        if min(self.in_channels, self.out_channels, self.stride, self.groups) < 1 or k < 1 or k % 2 == 0:
            raise SpecError(f"ReparamLargeKernelConv needs sizes >= 1 and an odd kernel_size, got {self}")
        if s is not None and (s < 1 or s % 2 == 0 or s > k):
            raise SpecError(f"ReparamLargeKernelConv small_kernel must be odd and <= kernel_size {k}, got {s}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise SpecError(
                f"ReparamLargeKernelConv channels {self.in_channels} -> {self.out_channels} "
                f"are not divisible by groups={self.groups}"
            )

    def describe(self) -> Block:
        cin, cout, k = self.in_channels, self.out_channels, self.kernel_size
        geo: Geometry = {"stride": self.stride, "groups": self.groups}

        def conv_bn(name: str, size: int) -> Branch:
            return (Conv(f"{name}.conv", cin, cout, size, padding=size // 2, **geo), BN(f"{name}.bn", cout))

        branches = (conv_bn("lkb_origin", k),) + (
            () if self.small_kernel is None else (conv_bn("small_conv", self.small_kernel),)
        )
        return Block("", self.kind, (Rep(branches, Conv("lkb_reparam", cin, cout, k, padding=k // 2, **geo)),))


@dataclass(frozen=True)
class RepCPESpec:
    """RepCPE: y = x + pe(x), `pe` a depthwise kxk conv with bias; deploy `reparam_conv`."""

    in_channels: int
    embed_dim: int = 768
    spatial_shape: tuple[int, int] = (7, 7)

    kind = "RepCPE"

    def __post_init__(self) -> None:
        h, w = self.spatial_shape
        if self.in_channels != self.embed_dim or self.in_channels < 1:
            raise SpecError(
                f"RepCPE adds its input, so in_channels must equal embed_dim, got {self.in_channels}, {self.embed_dim}"
            )
        if h != w or h % 2 == 0:
            raise SpecError(
                f"RepCPE spatial_shape must be square and odd (the official padding is "
                f"spatial_shape[0] // 2 on both sides), got {self.spatial_shape}"
            )

    def describe(self) -> Block:
        c, k = self.embed_dim, self.spatial_shape[0]
        pe = Conv("pe", c, c, k, padding=k // 2, groups=c, bias=True)
        return Block("", self.kind, (Rep(((pe,), ()), Conv("reparam_conv", c, c, k, padding=k // 2, groups=c)),))


# --------------------------------------------------------------------------- plain blocks


def conv_ffn(dim: int, hidden: int) -> Block:
    """ConvFFN: depthwise 7x7 conv + BN, fc1 (1x1, bias), GELU, fc2 (1x1, bias)."""
    return Block(
        "convffn",
        "ConvFFN",
        (
            Conv("conv.conv", dim, dim, 7, padding=3, groups=dim),
            BN("conv.bn", dim),
            Conv("fc1", dim, hidden, 1, bias=True),
            Act("gelu"),
            Conv("fc2", hidden, dim, 1, bias=True),
        ),
    )


def repmixer_block(name: str, dim: int, kernel_size: int, mlp_ratio: float) -> Block:
    """RepMixerBlock: x = token_mixer(x); x + layer_scale * convffn(x)."""
    ffn = (conv_ffn(dim, int(dim * mlp_ratio)), _layer_scale("layer_scale", dim))
    return Block(
        name, "RepMixerBlock", (_named(RepMixerSpec(dim, kernel_size).describe(), "token_mixer"), Add(((), ffn)))
    )


def attention_block(name: str, dim: int, mlp_ratio: float) -> Block:
    """AttentionBlock: x + layer_scale_1 * token_mixer(norm(x)), then x + layer_scale_2 * convffn(x)."""
    mixer = (BN("norm", dim), Attention("token_mixer", dim, dim // HEAD_DIM), _layer_scale("layer_scale_1", dim))
    ffn = (conv_ffn(dim, int(dim * mlp_ratio)), _layer_scale("layer_scale_2", dim))
    return Block(name, "AttentionBlock", (Add(((), mixer)), Add(((), ffn))))


def patch_embed(name: str, cin: int, cout: int, patch_size: int, stride: int) -> Block:
    """PatchEmbed: `proj.0` ReparamLargeKernelConv (groups = in channels, small 3x3), `proj.1`
    a 1x1 MobileOne block with GELU."""
    lk = ReparamLargeKernelConvSpec(cin, cout, patch_size, stride, groups=cin, small_kernel=3)
    pw = MobileOneBlockSpec(cout, cout, 1, act="gelu")
    return Block(name, "PatchEmbed", (_named(lk.describe(), "proj.0"), _named(pw.describe(), "proj.1")))


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class FastViTStageSpec:
    """One stage: `depth` blocks of width `dim` with token mixer `mixer`, after a RepCPE when
    `pos_emb`."""

    dim: int
    depth: int
    mixer: Mixer = "repmixer"
    mlp_ratio: float = 4.0
    pos_emb: bool = False

    def __post_init__(self) -> None:
        if self.dim < 1 or self.depth < 1 or self.mlp_ratio <= 0:
            raise SpecError(f"FastViT stage needs dim, depth >= 1 and mlp_ratio > 0, got {self}")
        if self.mixer == "attention" and self.dim % HEAD_DIM:
            raise SpecError(f"FastViT attention stage width {self.dim} is not divisible by head_dim {HEAD_DIM}")


NetworkEntry = tuple[int, Literal["pos_emb", "blocks", "patch_embed"], int]


@dataclass(frozen=True)
class FastViTSpec:
    """FastViT: `patch_embed` (3 MobileOne blocks), the flat `network` list, `conv_exp`, global
    pool, `head`."""

    name: str
    stages: tuple[FastViTStageSpec, ...]
    num_classes: int = 1000
    repmixer_kernel_size: int = 3
    down_patch_size: int = 7
    down_stride: int = 2
    cls_ratio: float = 2.0
    family: Literal["fastvit"] = "fastvit"

    def __post_init__(self) -> None:
        if not self.stages or self.num_classes < 1:
            raise SpecError(f"FastViT needs a stage and num_classes >= 1, got {len(self.stages)}, {self.num_classes}")

    @property
    def num_features(self) -> int:
        return int(self.stages[-1].dim * self.cls_ratio)

    def network(self) -> list[NetworkEntry]:
        """(index in `network`, what it holds, stage index), in forward order; a patch embed
        carries the index of the stage it leads into."""
        out: list[NetworkEntry] = []
        for i, stage in enumerate(self.stages):
            if i:
                out.append((len(out), "patch_embed", i))
            if stage.pos_emb:
                out.append((len(out), "pos_emb", i))
            out.append((len(out), "blocks", i))
        return out

    def _entry(self, n: int, what: str, i: int) -> list[Node]:
        stage = self.stages[i]
        if what == "patch_embed":
            cin = self.stages[i - 1].dim
            return [patch_embed(f"network.{n}", cin, stage.dim, self.down_patch_size, self.down_stride)]
        if what == "pos_emb":
            return [_named(RepCPESpec(stage.dim, stage.dim).describe(), f"network.{n}")]
        if stage.mixer == "attention":
            return [attention_block(f"network.{n}.{j}", stage.dim, stage.mlp_ratio) for j in range(stage.depth)]
        k = self.repmixer_kernel_size
        return [repmixer_block(f"network.{n}.{j}", stage.dim, k, stage.mlp_ratio) for j in range(stage.depth)]

    def describe(self) -> Model:
        c0, last = self.stages[0].dim, self.stages[-1].dim
        stem = [
            MobileOneBlockSpec(3, c0, 3, stride=2, act="gelu"),
            MobileOneBlockSpec(c0, c0, 3, stride=2, groups=c0, act="gelu"),
            MobileOneBlockSpec(c0, c0, 1, act="gelu"),
        ]
        body: list[Node] = [_named(b.describe(), f"patch_embed.{i}") for i, b in enumerate(stem)]
        for entry in self.network():
            body += self._entry(*entry)
        exp = MobileOneBlockSpec(last, self.num_features, 3, groups=last, use_se=True, act="gelu")
        body += [_named(exp.describe(), "conv_exp"), GlobalPool(), Flatten()]
        body.append(Linear("head", self.num_features, self.num_classes))
        return Model(self.name, "FastViT", tuple(body))


def fastvit_spec(
    name: str,
    layers: tuple[int, ...],
    embed_dims: tuple[int, ...],
    mlp_ratios: tuple[float, ...],
    attention_last: bool,
    num_classes: int = 1000,
) -> FastViTSpec:
    """A FastViT spec as the official registry builds it: RepMixer stages; with
    `attention_last` (the SA and MA variants) the last stage uses attention after a RepCPE."""
    n = len(layers)
    stages = tuple(
        FastViTStageSpec(
            d, depth, "attention" if attention_last and i == n - 1 else "repmixer", r, attention_last and i == n - 1
        )
        for i, (depth, d, r) in enumerate(zip(layers, embed_dims, mlp_ratios))
    )
    return FastViTSpec(name, stages, num_classes)


# The official registry (models/fastvit.py fastvit_t8 ... fastvit_ma36): layers, embed_dims,
# mlp_ratios, whether the last stage is RepCPE + attention.
_FASTVIT: dict[str, dict[str, Any]] = {
    "FastViT-T8": dict(layers=(2, 2, 4, 2), embed_dims=(48, 96, 192, 384), mlp_ratios=(3,) * 4, attention_last=False),
    "FastViT-T12": dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=(3,) * 4, attention_last=False),
    "FastViT-S12": dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=(4,) * 4, attention_last=False),
    "FastViT-SA12": dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=(4,) * 4, attention_last=True),
    "FastViT-SA24": dict(
        layers=(4, 4, 12, 4), embed_dims=(64, 128, 256, 512), mlp_ratios=(4,) * 4, attention_last=True
    ),
    "FastViT-SA36": dict(
        layers=(6, 6, 18, 6), embed_dims=(64, 128, 256, 512), mlp_ratios=(4,) * 4, attention_last=True
    ),
    "FastViT-MA36": dict(
        layers=(6, 6, 18, 6), embed_dims=(76, 152, 304, 608), mlp_ratios=(4,) * 4, attention_last=True
    ),
}


def _model(name: str, kw: dict[str, Any]) -> Callable[[int], FastViTSpec]:
    return lambda num_classes: fastvit_spec(name, num_classes=num_classes, **kw)


MODELS: dict[str, Callable[[int], FastViTSpec]] = {n: _model(n, kw) for n, kw in _FASTVIT.items()}

# timm's names (`fastvit_t8` ... `fastvit_ma36`).
ALIASES: dict[str, str] = {n.replace("FastViT-", "fastvit_").lower(): n for n in _FASTVIT}

# timm `fastvit.py` (facts from its FastVit and checkpoint_filter_fn): stages `stages.{i}` hold
# `downsample.proj` (the PatchEmbed leading into stage i), `pos_emb.pos_enc` (RepCPE's `pe`) and
# `blocks.{j}`; stem `stem`, `final_conv`, `head.fc`; MobileOneBlock `conv_kxk.{i}`,
# `conv_scale`, `identity`, SE `se.fc1`/`se.fc2`; ReparamLargeKernelConv `large_conv` and, in
# deploy form, `reparam_conv`; ConvFFN `mlp`; layer scales LayerScale2d modules holding `gamma`
# of shape (C, 1, 1), the official parameter's shape. The official flat `network.{n}` index of a
# stage's entries depends on the variant (a RepCPE shifts the rest), so the rules are a function
# of the spec. `ls{i}_`: a transit name that keeps `layer_scale` from matching inside
# `layer_scale_{i}` (a template has no end anchor).
_TIMM_INNER: Rules = [
    ("^stem.", "^patch_embed."),
    ("^final_conv.", "^conv_exp."),
    ("^head.fc.", "^head."),
    ("mlp.", "convffn."),
    ("conv_kxk.{i}.", "rbr_conv.{i}."),
    ("conv_scale.", "rbr_scale."),
    ("identity.", "rbr_skip."),
    ("se.fc1.", "se.reduce."),
    ("se.fc2.", "se.expand."),
    ("large_conv.", "lkb_origin."),
    ("proj.0.reparam_conv.", "proj.0.lkb_reparam."),
    ("layer_scale_{i}.gamma", "ls{i}_"),
    ("layer_scale.gamma", "layer_scale"),
    ("ls{i}_", "layer_scale_{i}"),
]


def timm_rules(spec: FastViTSpec) -> Rules:
    """timm's names for `spec`: its stage entries, then the module renames."""
    where = {"patch_embed": "downsample.", "pos_emb": "pos_emb.", "blocks": "blocks."}
    stages: Rules = []
    for n, what, i in spec.network():
        if what == "pos_emb":
            stages += [
                (f"^stages.{i}.pos_emb.pos_enc.", f"^network.{n}.pe."),
                (f"^stages.{i}.pos_emb.reparam_conv.", f"^network.{n}.reparam_conv."),
            ]
        else:
            stages.append((f"^stages.{i}.{where[what]}", f"^network.{n}."))
    return stages + _TIMM_INNER


KEYMAPS: dict[str, Callable[[FastViTSpec], Rules]] = {"timm": timm_rules}


# --------------------------------------------------------------------------- official constructors


def official_fastvit_mobileone_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    inference_mode: bool = False,
    use_se: bool = False,
    use_act: bool = True,
    use_scale_branch: bool = True,
    num_conv_branches: int = 1,
) -> MobileOneBlockSpec | Block:
    """apple/ml-fastvit `models.modules.mobileone.MobileOneBlock(...)` with its default
    activation (GELU): its spec, or with `inference_mode=True` its deploy-form description.
    SpecError where the official class would build inconsistent forms (dilation other than 1,
    misaligned padding, an even kernel) or no branch at all."""
    cls = "fastvit.MobileOneBlock"
    bools(cls, inference_mode=inference_mode, use_se=use_se, use_act=use_act, use_scale_branch=use_scale_branch)
    ints(
        cls,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        num_conv_branches=num_conv_branches,
    )
    if dilation != 1:
        raise SpecError(f"{cls} dilation must be 1: the official train-form branches ignore it (got {dilation})")
    if padding < 0:
        raise SpecError(f"{cls} padding must be >= 0, got {padding}")
    spec = MobileOneBlockSpec(
        in_channels,
        out_channels,
        kernel_size,
        stride,
        padding,
        groups,
        use_se,
        num_conv_branches,
        act="gelu" if use_act else "identity",
        use_scale_branch=use_scale_branch,
    )
    return to_deploy(spec.describe()) if inference_mode else spec  # type: ignore[return-value]


def official_repmixer(
    dim: int,
    kernel_size: int = 3,
    use_layer_scale: bool = True,
    layer_scale_init_value: float = 1e-5,
    inference_mode: bool = False,
) -> RepMixerSpec | Block:
    """apple/ml-fastvit `RepMixer(...)`: its spec, or its deploy form with `inference_mode`
    (`layer_scale_init_value` only sets the initial weights)."""
    bools("RepMixer", use_layer_scale=use_layer_scale, inference_mode=inference_mode)
    ints("RepMixer", dim=dim, kernel_size=kernel_size)
    if not isinstance(layer_scale_init_value, (int, float)) or isinstance(layer_scale_init_value, bool):
        raise SpecError(f"RepMixer layer_scale_init_value must be a number, got {layer_scale_init_value!r}")
    spec = RepMixerSpec(dim, kernel_size, use_layer_scale)
    return to_deploy(spec.describe()) if inference_mode else spec  # type: ignore[return-value]


def official_reparam_large_kernel_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    groups: int,
    small_kernel: int | None,
    inference_mode: bool = False,
) -> ReparamLargeKernelConvSpec | Block:
    """apple/ml-fastvit `ReparamLargeKernelConv(...)` (its activation argument is not taken:
    the official forward discards the activation's output)."""
    cls = "ReparamLargeKernelConv"
    bools(cls, inference_mode=inference_mode)
    ints(cls, in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride, groups=groups)
    if small_kernel is not None:
        ints(cls, small_kernel=small_kernel)
    spec = ReparamLargeKernelConvSpec(in_channels, out_channels, kernel_size, stride, groups, small_kernel)
    return to_deploy(spec.describe()) if inference_mode else spec  # type: ignore[return-value]


def official_rep_cpe(
    in_channels: int,
    embed_dim: int = 768,
    spatial_shape: int | tuple[int, int] = (7, 7),
    inference_mode: bool = False,
) -> RepCPESpec | Block:
    """apple/ml-fastvit `RepCPE(...)`: its spec, or its deploy form with `inference_mode`."""
    bools("RepCPE", inference_mode=inference_mode)
    ints("RepCPE", in_channels=in_channels, embed_dim=embed_dim)
    spec = RepCPESpec(in_channels, embed_dim, pair(spatial_shape))
    return to_deploy(spec.describe()) if inference_mode else spec  # type: ignore[return-value]


OFFICIAL: dict[str, Callable[..., Any]] = {
    "fastvit.MobileOneBlock": official_fastvit_mobileone_block,
    "RepMixer": official_repmixer,
    "ReparamLargeKernelConv": official_reparam_large_kernel_conv,
    "RepCPE": official_rep_cpe,
}

__all__ = [
    "FastViTSpec",
    "FastViTStageSpec",
    "RepMixerSpec",
    "ReparamLargeKernelConvSpec",
    "RepCPESpec",
    "fastvit_spec",
    "timm_rules",
    "MODELS",
    "ALIASES",
    "KEYMAPS",
    "OFFICIAL",
]
