"""The neutral state's schema: for a spec and a form, every canonical key with its shape and kind.

Canonical keys are the official PyTorch names; conv weights are OIHW with I = in / groups. The
schema is the single place that turns a spec into names: backends, checkpoint readers, layout
converters and the parameter counter all read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

from .errors import CheckpointError
from .specs import (BlockSpec, ModelSpec, RepBlockSpec, RepGhostBottleneckSpec, RepGhostModuleSpec,
                    RepGhostNetSpec, RepVGGSpec)

Form = Literal["train", "deploy"]
FORMS: tuple[Form, ...] = ("train", "deploy")

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class TensorInfo:
    """Shape and role of one tensor. `kind` is `<layer>.<field>` with layer in conv, bn, linear."""

    shape: tuple[int, ...]
    kind: str
    groups: int = 1

    @property
    def learnable(self) -> bool:
        return not self.kind.startswith("bn.running")


Schema = dict[str, TensorInfo]


@dataclass(frozen=True)
class RepBlockNames:
    """Relative module names inside a RepVGG-style block."""

    dense_conv: str
    dense_bn: str
    one_conv: str
    one_bn: str
    identity: str = "rbr_identity"
    reparam: str = "rbr_reparam"


def repblock_names(spec: RepBlockSpec) -> RepBlockNames:
    if spec.naming == "repconv":  # YOLOv7: nn.Sequential(conv, bn)
        return RepBlockNames("rbr_dense.0", "rbr_dense.1", "rbr_1x1.0", "rbr_1x1.1")
    return RepBlockNames("rbr_dense.conv", "rbr_dense.bn", "rbr_1x1.conv", "rbr_1x1.bn")


def join_key(prefix: str, name: str) -> str:
    """`prefix.name`, or just `name` for an empty prefix (block-relative keys)."""
    return f"{prefix}.{name}" if prefix else name


def conv_entries(prefix: str, cin: int, cout: int, k: int, groups: int = 1,
                 bias: bool = False) -> Schema:
    out = {join_key(prefix, "weight"): TensorInfo((cout, cin // groups, k, k), "conv.weight", groups)}
    if bias:
        out[join_key(prefix, "bias")] = TensorInfo((cout,), "conv.bias", groups)
    return out


def bn_entries(prefix: str, channels: int) -> Schema:
    return {join_key(prefix, f): TensorInfo((channels,), f"bn.{f}") for f in BN_FIELDS}


def linear_entries(prefix: str, cin: int, cout: int) -> Schema:
    return {join_key(prefix, "weight"): TensorInfo((cout, cin), "linear.weight"),
            join_key(prefix, "bias"): TensorInfo((cout,), "linear.bias")}


def se_entries(prefix: str, channels: int, hidden: int, down: str = "down", up: str = "up") -> Schema:
    return {**conv_entries(join_key(prefix, down), channels, hidden, 1, bias=True),
            **conv_entries(join_key(prefix, up), hidden, channels, 1, bias=True)}


def repblock_schema(b: RepBlockSpec, prefix: str, form: Form) -> Schema:
    n = repblock_names(b)
    p = lambda name: join_key(prefix, name)  # noqa: E731
    out: Schema = {}
    if form == "deploy":
        out.update(conv_entries(p(n.reparam), b.in_channels, b.out_channels, b.kernel_size,
                                b.groups, bias=True))
    else:
        out.update(conv_entries(p(n.dense_conv), b.in_channels, b.out_channels, b.kernel_size,
                                b.groups, bias=b.conv_bias))
        out.update(bn_entries(p(n.dense_bn), b.out_channels))
        out.update(conv_entries(p(n.one_conv), b.in_channels, b.out_channels, 1, b.groups,
                                bias=b.conv_bias))
        out.update(bn_entries(p(n.one_bn), b.out_channels))
        if b.has_identity:
            out.update(bn_entries(p(n.identity), b.out_channels))
    if b.se != "none":
        out.update(se_entries(p(b.se_module), b.out_channels, b.se_channels))
    return out


def ghost_module_schema(m: RepGhostModuleSpec, prefix: str, form: Form) -> Schema:
    p = lambda name: join_key(prefix, name)  # noqa: E731
    out = {**conv_entries(p("primary_conv.0"), m.in_channels, m.out_channels, m.kernel_size),
           **bn_entries(p("primary_conv.1"), m.out_channels)}
    c = m.out_channels
    if form == "deploy":
        out.update(conv_entries(p("cheap_operation"), c, c, m.dw_size, groups=c, bias=True))
    else:
        out.update(conv_entries(p("cheap_operation.0"), c, c, m.dw_size, groups=c))
        out.update(bn_entries(p("cheap_operation.1"), c))
        if m.reparam_bn:
            out.update(bn_entries(p("fusion_bn.0"), c))
    return out


def bottleneck_schema(b: RepGhostBottleneckSpec, prefix: str, form: Form) -> Schema:
    p = lambda name: join_key(prefix, name)  # noqa: E731
    out = ghost_module_schema(b.ghost1, p("ghost1"), form)
    if b.stride > 1:
        out.update(conv_entries(p("conv_dw"), b.mid_channels, b.mid_channels, b.dw_kernel_size,
                                groups=b.mid_channels))
        out.update(bn_entries(p("bn_dw"), b.mid_channels))
    if b.se_channels:
        out.update(se_entries(p("se"), b.mid_channels, b.se_channels, "conv_reduce", "conv_expand"))
    out.update(ghost_module_schema(b.ghost2, p("ghost2"), form))
    if b.has_conv_shortcut:
        out.update(conv_entries(p("shortcut.0"), b.in_channels, b.in_channels, b.dw_kernel_size,
                                groups=b.in_channels))
        out.update(bn_entries(p("shortcut.1"), b.in_channels))
        out.update(conv_entries(p("shortcut.2"), b.in_channels, b.out_channels, 1))
        out.update(bn_entries(p("shortcut.3"), b.out_channels))
    return out


def aux_head_schema(prefix: str, channels: int, num_classes: int) -> Schema:
    """RepVGGplus aux head: Sequential(conv3x3 s2 + BN + ReLU, pool, flatten, linear)."""
    return {**conv_entries(f"{prefix}.0.conv", channels, channels, 3),
            **bn_entries(f"{prefix}.0.bn", channels),
            **linear_entries(f"{prefix}.3", channels, num_classes)}


def block_schema(spec: BlockSpec, form: Form, prefix: str = "") -> Schema:
    """The keys of one block (relative to it when prefix is empty)."""
    if isinstance(spec, RepBlockSpec):
        return repblock_schema(spec, prefix, form)
    if isinstance(spec, RepGhostModuleSpec):
        return ghost_module_schema(spec, prefix, form)
    return bottleneck_schema(spec, prefix, form)


def state_schema(spec: ModelSpec, form: Form) -> Schema:
    """Every canonical key of the model's state in the given form, in forward order."""
    if form not in FORMS:
        raise ValueError(f"form must be 'train' or 'deploy', got {form!r}")
    out: Schema = {}
    if isinstance(spec, RepVGGSpec):
        for prefix, b in spec.blocks():
            out.update(repblock_schema(b, prefix, form))
        out.update(linear_entries("linear", spec.num_features, spec.num_classes))
        if form == "train":
            for stage in spec.aux_heads:
                out.update(aux_head_schema(f"{stage}_aux", spec.aux_channels(stage), spec.num_classes))
        return out
    assert isinstance(spec, RepGhostNetSpec)
    out.update(conv_entries("conv_stem", 3, spec.stem_channels, 3))
    out.update(bn_entries("bn1", spec.stem_channels))
    for i, stage in enumerate(spec.stages):
        for j, b in enumerate(stage):
            out.update(bottleneck_schema(b, f"blocks.{i}.{j}", form))
    out.update(conv_entries(f"{spec.last_prefix}.conv", spec.last_in_channels, spec.last_channels, 1))
    out.update(bn_entries(f"{spec.last_prefix}.bn1", spec.last_channels))
    out.update(conv_entries("conv_head", spec.last_channels, spec.head_channels, 1, bias=True))
    out.update(linear_entries("classifier", spec.head_channels, spec.num_classes))
    return out


def schema_for(spec: ModelSpec | BlockSpec, form: Form) -> Schema:
    """state_schema for a model spec, block_schema (relative keys) for a block spec."""
    if isinstance(spec, (RepVGGSpec, RepGhostNetSpec)):
        return state_schema(spec, form)
    return block_schema(spec, form)


def spec_name(spec: ModelSpec | BlockSpec) -> str:
    return getattr(spec, "name", type(spec).__name__)


def detect_form(spec: ModelSpec | BlockSpec, keys: Iterable[str]) -> Form:
    """Which form a set of canonical keys is in; CheckpointError when neither fits well."""
    keys = {k for k in keys if not k.endswith("num_batches_tracked")}
    scores = {f: len(keys & set(schema_for(spec, f))) for f in FORMS}
    sizes = {f: len(schema_for(spec, f)) for f in FORMS}
    best = max(FORMS, key=lambda f: (scores[f] / sizes[f], scores[f]))
    if scores[best] == 0:
        sample = ", ".join(sorted(keys)[:3])
        raise CheckpointError(f"no key matches {spec_name(spec)} in either form (first keys: {sample})")
    return best
