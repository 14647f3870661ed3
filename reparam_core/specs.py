"""The model registry and the spec types of every family (defined in reparam_core.families).

A spec is a family's constructor data; `spec.describe()` gives its block description
(reparam_core.nodes), which every other part of the library reads. Module paths (and so weight
names) follow the official PyTorch code.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict
from typing import Callable, Union

from .errors import SpecError, UnknownModelError
from .families import repghost, repvgg
from .families.repghost import (RepGhostBottleneckSpec, RepGhostModuleSpec, RepGhostNetSpec,
                                make_divisible, repghostnet_spec)
from .families.repvgg import RepBlockSpec, RepVGGSpec, StageSpec, repconv_spec, repvgg_spec
from .nodes import describe

ModelSpec = Union[RepVGGSpec, RepGhostNetSpec]
BlockSpec = Union[RepBlockSpec, RepGhostModuleSpec, RepGhostBottleneckSpec]

_REGISTRY: dict[str, Callable[[int], ModelSpec]] = {**repvgg.MODELS, **repghost.MODELS}


def list_models() -> list[str]:
    """Every model name the library can build, official names first."""
    return list(_REGISTRY)


def get_spec(name: str, num_classes: int = 1000) -> ModelSpec:
    """The spec of a registered model; UnknownModelError (with close names) otherwise."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(_REGISTRY)}"
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    if num_classes < 1:
        raise SpecError(f"num_classes must be >= 1, got {num_classes}")
    return _REGISTRY[name](num_classes)


def block_kind(spec: object) -> str:
    """The official class a block or model spec describes (RepVGGBlock, RepConv,
    RepVGGplusBlock, RepGhostModule, RepGhostBottleneck, RepVGG, ...)."""
    return describe(spec).kind  # type: ignore[arg-type]


_BLOCK_KINDS: dict[str, type] = {"repblock": RepBlockSpec, "ghost_module": RepGhostModuleSpec,
                                 "ghost_bottleneck": RepGhostBottleneckSpec}


def block_spec_to_dict(spec: BlockSpec) -> dict:
    """A block spec as JSON-able data with its kind (for the MegEngine worker and JSON reports)."""
    kind = next((k for k, t in _BLOCK_KINDS.items() if type(spec) is t), None)
    if kind is None:
        raise SpecError(f"not a block spec: {type(spec).__name__}")
    return {"kind": kind, **asdict(spec)}


def block_spec_from_dict(data: dict) -> BlockSpec:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _BLOCK_KINDS:
        raise SpecError(f"unknown block kind {kind!r}; expected one of {', '.join(_BLOCK_KINDS)}")
    try:
        return _BLOCK_KINDS[kind](**data)
    except TypeError as e:
        raise SpecError(f"bad {kind} block spec: {e}") from None


__all__ = ["RepBlockSpec", "RepGhostModuleSpec", "RepGhostBottleneckSpec", "StageSpec", "RepVGGSpec",
           "RepGhostNetSpec", "ModelSpec", "list_models", "get_spec", "repvgg_spec",
           "repghostnet_spec", "make_divisible", "BlockSpec",
           "block_spec_to_dict", "block_spec_from_dict", "repconv_spec", "block_kind"]
