"""The neutral state's schema: for a description (or a spec) in a form, every canonical key with
its shape and kind, in forward order.

Canonical keys are the official PyTorch names; conv weights are OIHW with I = in / groups. One
rule per node type below turns a description into names; backends, checkpoint readers, layout
converters and the parameter counter all read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from ..errors import CheckpointError
from .nodes import BN, SE, Add, Aux, Block, Conv, Description, Linear, Model, Node, PadBN, Rep, Scale, in_form, join_key

Form = Literal["train", "deploy"]
FORMS: tuple[Form, ...] = ("train", "deploy")

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class TensorInfo:
    """Shape and role of one tensor. `kind` is `<layer>.<field>` with layer in conv, bn, linear,
    scale."""

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


def node_schema(node: Node | Aux, prefix: str = "") -> Schema:
    """The keys of one node (and of everything inside it), in forward order."""
    if isinstance(node, Conv):
        return conv_entries(join_key(prefix, node.name), node)
    if isinstance(node, (BN, PadBN)):
        return bn_entries(join_key(prefix, node.name), node.channels)
    if isinstance(node, Scale):
        return {join_key(prefix, f"{node.name}.weight"): TensorInfo((node.channels,), "scale.weight")}
    if isinstance(node, Linear):
        key = join_key(prefix, node.name)
        return {
            f"{key}.weight": TensorInfo((node.out_features, node.in_features), "linear.weight"),
            f"{key}.bias": TensorInfo((node.out_features,), "linear.bias"),
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
        if node.bn is not None:
            out.update(node_schema(node.bn, prefix))
    elif isinstance(node, Add):
        for chain in node.branches:
            for item in chain:
                out.update(node_schema(item, prefix))
    elif isinstance(node, (Block, Aux)):
        inner = join_key(prefix, node.name) if isinstance(node, Block) else prefix
        for child in node.body:
            out.update(node_schema(child, inner))
    return out


def schema_of(desc: Description, prefix: str = "") -> Schema:
    """Every canonical key of a description (in the form it is in): a model's body, then its
    auxiliary heads; a block's keys relative to it (or under `prefix`)."""
    if isinstance(desc, Block):
        out: Schema = {}
        for n in desc.body:
            out.update(node_schema(n, prefix))
        return out
    out = {}
    for top in (*desc.body, *desc.aux):
        out.update(node_schema(top, prefix))
    return out


def schema_for(spec: object, form: Form) -> Schema:
    """The schema of a model or block spec (block: relative keys) in the given form."""
    return schema_of(in_form(spec, form))  # type: ignore[arg-type]


def state_schema(spec: object, form: Form) -> Schema:
    """Every canonical key of the model's state in the given form, in forward order."""
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
