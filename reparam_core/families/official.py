"""Blocks from their official constructors: `official_block("ACBlock", in_channels=16, ...)`.

Each family file exports `OFFICIAL`, a dict from an official class name (as users write it,
e.g. `RepVGGBlock`, `yolov6.QARepVGGBlockV2`) to a function that takes that class's constructor
arguments, under their official keyword names, and returns the block's spec or description
(anything `reparam_core.blocks.nodes.describe` accepts; its state keys are the official class's keys,
relative to the block). This module only collects them and checks the call.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from ..blocks.nodes import Describable, Description
from ..errors import SpecError
from . import acnet, dbb, fastvit, mobileone, qarepvgg, repghost, repvgg, repvit, unireplknet

OfficialCtor = Callable[..., "Describable | Description"]

_FAMILIES = (repvgg, repghost, mobileone, qarepvgg, dbb, acnet, unireplknet, repvit, fastvit)


def _registry() -> dict[str, OfficialCtor]:
    out: dict[str, OfficialCtor] = {}
    for fam in _FAMILIES:
        out.update(getattr(fam, "OFFICIAL", {}))
    return out


def official_classes() -> list[str]:
    """Every official class name `official_block` accepts."""
    return sorted(_registry(), key=str.lower)


def official_signature(class_name: str) -> inspect.Signature:
    """The constructor signature accepted for `class_name` (official keyword names)."""
    return inspect.signature(_lookup(class_name))


def _lookup(class_name: str) -> OfficialCtor:
    reg = _registry()
    if class_name in reg:
        return reg[class_name]
    folded = {k.lower(): k for k in reg}
    if class_name.lower() in folded:
        return reg[folded[class_name.lower()]]
    close = difflib.get_close_matches(class_name, list(reg), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise SpecError(f"unknown official block class {class_name!r}{hint}; accepted: {', '.join(official_classes())}")


def official_block(class_name: str, /, *args: Any, **kwargs: Any) -> Describable | Description:
    """The spec of the block that the official class `class_name` builds with these constructor
    arguments (positional or by their official keyword names).

    Raises SpecError naming the class and listing what is accepted for an unknown class, an
    unknown or missing argument, or a value the official class would not accept."""
    ctor = _lookup(class_name)
    sig = inspect.signature(ctor)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        accepted = ", ".join(
            p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
            for p in sig.parameters.values()
        )
        raise SpecError(f"{class_name}: {e}; accepted arguments: {accepted}") from None
    return ctor(*args, **kwargs)


__all__ = ["official_block", "official_classes", "official_signature", "OfficialCtor"]
