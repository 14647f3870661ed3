"""Block descriptions as JSON-able data, and back: how any block crosses a process boundary (the
MegEngine worker) or lands in a report, whatever family or official class it came from.

A node is `{"node": type name, field: value, ...}` with every field of its dataclass; nested
nodes, branches, pairs and other tuples (a Scale's `shape`, a Rep's `coefficients`) are lists,
read back as tuples; floats are written as their shortest repr, so they come back exact.
Reading checks the type name against the description's own types and rebuilds through the
dataclasses, so a description read back is validated exactly as one built in Python (`Rep`
re-checks its fusability)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from ..errors import SpecError
from . import nodes

_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (
        nodes.Conv,
        nodes.BN,
        nodes.PadBN,
        nodes.AvgPool,
        nodes.Scale,
        nodes.Bias,
        nodes.Act,
        nodes.SE,
        nodes.Linear,
        nodes.LayerNorm,
        nodes.GRN,
        nodes.Attention,
        nodes.GlobalPool,
        nodes.Flatten,
        nodes.Dropout,
        nodes.Rep,
        nodes.Add,
        nodes.Block,
        nodes.Aux,
        nodes.Model,
    )
}


def _encode(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        if type(value).__name__ not in _TYPES:
            raise SpecError(f"not a description node: {type(value).__name__}")
        return {"node": type(value).__name__, **{f.name: _encode(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        data = dict(value)
        name = data.pop("node", None)
        cls = _TYPES.get(name) if isinstance(name, str) else None
        if cls is None:
            raise SpecError(f"unknown description node {name!r}; expected one of {', '.join(_TYPES)}")
        try:
            return cls(**{k: _decode(v) for k, v in data.items()})
        except TypeError as e:
            raise SpecError(f"bad {name} node: {e}") from None
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def description_to_data(desc: nodes.Description) -> dict[str, Any]:
    """A Block or Model description as JSON-able nested dicts and lists."""
    if not isinstance(desc, (nodes.Block, nodes.Model)):
        raise SpecError(f"not a block or model description: {type(desc).__name__}")
    out: dict[str, Any] = _encode(desc)
    return out


def description_from_data(data: dict[str, Any]) -> nodes.Description:
    """The description `description_to_data` wrote; SpecError (or FusionError for a Rep that is
    not one conv) naming the node at fault."""
    desc = _decode(data)
    if not isinstance(desc, (nodes.Block, nodes.Model)):
        raise SpecError(f"not a block or model description: {type(desc).__name__}")
    return desc


__all__ = ["description_to_data", "description_from_data"]
