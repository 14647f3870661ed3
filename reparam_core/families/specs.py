"""The model registry and the spec types of every family (defined in reparam_core.families).

A spec is a family's constructor data; `spec.describe()` gives its block description
(reparam_core.blocks.nodes), which every other part of the library reads. Module paths (and so weight
names) follow the official PyTorch code.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from ..blocks.nodes import Block, describe
from ..blocks.nodes_io import description_from_data, description_to_data
from ..errors import SpecError, UnknownModelError
from . import fastvit, mobileone, qarepvgg, repghost, repvgg, repvit, unireplknet
from .fastvit import FastViTSpec
from .mobileone import MobileOneBlockSpec, MobileOneSpec
from .qarepvgg import QARepBlockSpec, qarepvgg_spec
from .repghost import RepGhostBottleneckSpec, RepGhostModuleSpec, RepGhostNetSpec, make_divisible, repghostnet_spec
from .repvgg import RepBlockSpec, RepVGGSpec, StageSpec, repconv_spec, repvgg_spec
from .repvit import RepViTSpec
from .unireplknet import UniRepLKNetSpec

ModelSpec = RepVGGSpec | RepGhostNetSpec | MobileOneSpec | UniRepLKNetSpec | RepViTSpec | FastViTSpec
BlockSpec = RepBlockSpec | RepGhostModuleSpec | RepGhostBottleneckSpec | MobileOneBlockSpec | QARepBlockSpec

_FAMILIES = (repvgg, repghost, mobileone, qarepvgg, unireplknet, repvit, fastvit)
_REGISTRY: dict[str, Callable[[int], ModelSpec]] = {
    name: entry for fam in _FAMILIES for name, entry in fam.MODELS.items()
}
# Other names users know a model by (timm's, the official repositories' registry names): each
# family file's ALIASES, alias -> registry name.
_ALIASES: dict[str, str] = {alias: name for fam in _FAMILIES for alias, name in getattr(fam, "ALIASES", {}).items()}


def list_models() -> list[str]:
    """Every model name the library can build, official names first."""
    return list(_REGISTRY)


def resolve_model_name(name: str) -> str:
    """The registry name for `name`: a registry name or an alias (timm's `repvgg_a0`, an
    official registry's name), case-insensitively; UnknownModelError listing close names."""
    if name in _REGISTRY:
        return name
    folded = {k.lower(): k for k in _REGISTRY}
    folded.update({a.lower(): n for a, n in _ALIASES.items()})
    if name.lower() in folded:
        return folded[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(folded), n=3, cutoff=0.5)
    close = list(dict.fromkeys(folded[c] for c in close))
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(_REGISTRY)}"
    raise UnknownModelError(f"unknown model {name!r}{hint}")


def get_spec(name: str, num_classes: int = 1000) -> ModelSpec:
    """The spec of a registered model (by registry name or alias, see resolve_model_name)."""
    key = resolve_model_name(name)
    if num_classes < 1:
        raise SpecError(f"num_classes must be >= 1, got {num_classes}")
    return _REGISTRY[key](num_classes)


def block_kind(spec: object) -> str:
    """The official class a block or model spec describes (RepVGGBlock, RepConv,
    RepVGGplusBlock, RepGhostModule, RepGhostBottleneck, RepVGG, ...)."""
    return describe(spec).kind  # type: ignore[arg-type]


_BLOCK_KINDS: dict[str, type[RepBlockSpec] | type[RepGhostModuleSpec] | type[RepGhostBottleneckSpec]] = {
    "repblock": RepBlockSpec,
    "ghost_module": RepGhostModuleSpec,
    "ghost_bottleneck": RepGhostBottleneckSpec,
}


def block_spec_to_dict(spec: object) -> dict[str, Any]:
    """A block spec as JSON-able data with its kind (for the MegEngine worker and JSON reports):
    the spec's fields for the registered kinds, else its description (any family, any official
    class: reparam_core.blocks.nodes_io)."""
    kind = next((k for k, t in _BLOCK_KINDS.items() if type(spec) is t), None)
    if kind is not None:
        return {"kind": kind, **asdict(spec)}  # type: ignore[call-overload]
    desc = describe(spec)  # type: ignore[arg-type]
    if not isinstance(desc, Block):
        raise SpecError(f"not a block spec: {type(spec).__name__} describes a {desc.kind} model")
    return {"kind": "description", "description": description_to_data(desc)}


def block_spec_from_dict(data: Mapping[str, Any]) -> BlockSpec | Block:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind == "description":
        desc = description_from_data(data.get("description", {}))
        if not isinstance(desc, Block):
            raise SpecError(f"a block request holds a {desc.kind} model description")
        return desc
    if kind not in _BLOCK_KINDS:
        raise SpecError(f"unknown block kind {kind!r}; expected one of {', '.join([*_BLOCK_KINDS, 'description'])}")
    try:
        return _BLOCK_KINDS[kind](**data)
    except TypeError as e:
        raise SpecError(f"bad {kind} block spec: {e}") from None


__all__ = [
    "RepBlockSpec",
    "RepGhostModuleSpec",
    "RepGhostBottleneckSpec",
    "StageSpec",
    "RepVGGSpec",
    "RepGhostNetSpec",
    "ModelSpec",
    "list_models",
    "get_spec",
    "repvgg_spec",
    "repghostnet_spec",
    "make_divisible",
    "BlockSpec",
    "resolve_model_name",
    "block_spec_to_dict",
    "block_spec_from_dict",
    "repconv_spec",
    "block_kind",
    "QARepBlockSpec",
    "qarepvgg_spec",
]
