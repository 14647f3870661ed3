"""The neutral state's schema: for a description (or a spec) in a form, every canonical key with
its shape and kind, in module order (`module_order`: forward order, except that a module's own
tensors come before its children's and a container's children stay together, as
torch.nn.Module.state_dict lists them and the official checkpoints hold them).

Canonical keys are the official PyTorch names; conv weights are OIHW with I = in / groups. One
rule per node type below turns a description into names; backends, checkpoint readers, layout
converters and the parameter counter all read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from ..errors import CheckpointError
from .nodes import (
    BN,
    GRN,
    SE,
    Add,
    Attention,
    Aux,
    Bias,
    Block,
    Conv,
    Description,
    LayerNorm,
    Linear,
    Model,
    Node,
    PadBN,
    Rep,
    Scale,
    in_form,
    join_key,
)

Form = Literal["train", "deploy"]
FORMS: tuple[Form, ...] = ("train", "deploy")

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class TensorInfo:
    """Shape and role of one tensor. `kind` is `<layer>.<field>`: conv.weight, conv.bias,
    bn.<weight|bias|running_mean|running_var>, linear.weight, linear.bias (Attention's qkv and
    proj too), scale.weight (every Scale, whatever its parameter's name), bias.bias (a Bias
    node), layernorm.weight, layernorm.bias, grn.gamma, grn.beta. The role, not the name: a
    Scale stored as `gamma` is still `scale.weight`."""

    shape: tuple[int, ...]
    kind: str
    groups: int = 1

    @property
    def learnable(self) -> bool:
        return not self.kind.startswith("bn.running")


Schema = dict[str, TensorInfo]


def conv_entries(key: str, conv: Conv) -> Schema:
    out = {
        join_key(key, "weight"): TensorInfo(
            (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel), "conv.weight", conv.groups
        )
    }
    if conv.bias:
        out[join_key(key, "bias")] = TensorInfo((conv.out_channels,), "conv.bias", conv.groups)
    return out


def bn_entries(key: str, channels: int) -> Schema:
    return {join_key(key, f): TensorInfo((channels,), f"bn.{f}") for f in BN_FIELDS}


def linear_entries(key: str, in_features: int, out_features: int, bias: bool) -> Schema:
    """A Linear's `weight` (O, I) and, when it has one, `bias` (O,)."""
    out = {join_key(key, "weight"): TensorInfo((out_features, in_features), "linear.weight")}
    if bias:
        out[join_key(key, "bias")] = TensorInfo((out_features,), "linear.bias")
    return out


def node_schema(node: Node | Aux, prefix: str = "") -> Schema:
    """The keys of one node (and of everything inside it), in forward order."""
    if isinstance(node, Conv):
        return conv_entries(join_key(prefix, node.name), node)
    if isinstance(node, (BN, PadBN)):
        return bn_entries(join_key(prefix, node.name), node.channels)
    if isinstance(node, (Scale, Bias)):
        kind = "scale.weight" if isinstance(node, Scale) else "bias.bias"
        return {join_key(prefix, node.key): TensorInfo(node.stored_shape, kind)}
    if isinstance(node, Linear):
        return linear_entries(join_key(prefix, node.name), node.in_features, node.out_features, node.bias)
    if isinstance(node, LayerNorm):
        key = join_key(prefix, node.name)
        return {join_key(key, f): TensorInfo((node.channels,), f"layernorm.{f}") for f in ("weight", "bias")}
    if isinstance(node, GRN):
        key = join_key(prefix, node.name)
        fields = ("gamma", "beta") if node.bias else ("gamma",)
        return {join_key(key, f): TensorInfo(node.stored_shape, f"grn.{f}") for f in fields}
    if isinstance(node, Attention):
        key = join_key(prefix, node.name)
        return {
            **linear_entries(join_key(key, node.qkv), node.dim, 3 * node.dim, node.qkv_bias),
            **linear_entries(join_key(key, node.proj), node.dim, node.dim, True),
        }
    if isinstance(node, SE):
        key = join_key(prefix, node.name)
        return {
            **conv_entries(join_key(key, node.reduce), Conv(node.reduce, node.channels, node.hidden, bias=True)),
            **conv_entries(join_key(key, node.expand), Conv(node.expand, node.hidden, node.channels, bias=True)),
        }
    out: Schema = {}
    if isinstance(node, Rep):
        for branch in node.branches:
            for leaf in branch:
                out.update(node_schema(leaf, prefix))
        for after in (node.bn, node.scale):
            if after is not None:
                out.update(node_schema(after, prefix))
    elif isinstance(node, Add):
        for chain in node.branches:
            for item in chain:
                out.update(node_schema(item, prefix))
    elif isinstance(node, (Block, Aux)):
        inner = join_key(prefix, node.name) if isinstance(node, Block) else prefix
        for child in node.body:
            out.update(node_schema(child, inner))
    return out


@dataclass
class _ModuleKeys:
    """The keys of one module's own tensors and its child modules by name, in first-seen order."""

    own: list[str] = field(default_factory=list)
    children: dict[str, _ModuleKeys] = field(default_factory=dict)


def module_order(schema: Schema) -> Schema:
    """The keys in module order: a module's own tensors (keys `path.field`) first, in the order
    given, then its child modules in the order they first appear, each in module order.

    Forward order is module order for most descriptions; they differ where a block holds a
    tensor itself after its children run (UniRepLKNet's `gamma`, FastViT's `layer_scale`) or a
    container's children are interleaved with another's in the forward pass (UniRepLKNet's
    `downsample_layers.{i}` between the `stages.{i}`)."""
    root = _ModuleKeys()
    for key in schema:
        node = root
        for part in key.split(".")[:-1]:
            node = node.children.setdefault(part, _ModuleKeys())
        node.own.append(key)
    out: Schema = {}

    def visit(node: _ModuleKeys) -> None:
        for key in node.own:
            out[key] = schema[key]
        for child in node.children.values():
            visit(child)

    visit(root)
    return out


def schema_of(desc: Description, prefix: str = "") -> Schema:
    """Every canonical key of a description (in the form it is in), in module order: a model's
    body, then its auxiliary heads; a block's keys relative to it (or under `prefix`)."""
    out: Schema = {}
    for top in (*desc.body, *desc.aux) if isinstance(desc, Model) else desc.body:
        out.update(node_schema(top, prefix))
    return module_order(out)


def schema_for(spec: object, form: Form) -> Schema:
    """The schema of a model or block spec (block: relative keys) in the given form."""
    return schema_of(in_form(spec, form))  # type: ignore[arg-type]


def state_schema(spec: object, form: Form) -> Schema:
    """Every canonical key of the model's state in the given form, in module order."""
    return schema_for(spec, form)


def block_schema(spec: object, form: Form, prefix: str = "") -> Schema:
    """The keys of one block (relative to it when prefix is empty)."""
    return schema_of(in_form(spec, form), prefix)  # type: ignore[arg-type]


def spec_name(spec: object) -> str:
    name = getattr(spec, "name", None)
    if isinstance(spec, Block):
        return spec.kind
    return name if isinstance(name, str) else type(spec).__name__


def detect_form(
    spec: object, keys: Iterable[str], names: Callable[[str], str] | None = None, source: str = "state"
) -> Form:
    """Which form a set of canonical keys is in; CheckpointError naming `source` when neither
    fits well, quoting its first keys as `names` spells them (the source's own names, see
    reparam_core.weights.keymaps.KeyNames; default: as given)."""
    keys = {k for k in keys if not k.endswith("num_batches_tracked")}
    schemas = {f: schema_for(spec, f) for f in FORMS}
    scores = {f: len(keys & set(schemas[f])) for f in FORMS}
    best = max(FORMS, key=lambda f: (scores[f] / max(1, len(schemas[f])), scores[f]))
    if scores[best] == 0:
        spell = names or str
        sample = ", ".join(sorted(spell(k) for k in keys)[:3])
        raise CheckpointError(f"{source}: no key matches {spec_name(spec)} in either form (first keys: {sample})")
    return best


def is_model(spec: object) -> bool:
    """Whether a spec (or description) describes a whole model rather than one block."""
    from .nodes import describe

    return isinstance(describe(spec), Model)  # type: ignore[arg-type]


__all__ = [
    "Form",
    "FORMS",
    "BN_FIELDS",
    "TensorInfo",
    "Schema",
    "conv_entries",
    "bn_entries",
    "linear_entries",
    "node_schema",
    "schema_of",
    "schema_for",
    "state_schema",
    "block_schema",
    "spec_name",
    "detect_form",
    "is_model",
    "join_key",
]
