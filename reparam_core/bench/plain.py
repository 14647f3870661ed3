"""The plain reference of a deploy form made of conv + activation blocks (RepVGG): the conv
stack as a list of layers, read from the deploy description.

A benchmark compares the deploy form (our blocks after re-parameterization) with the same
network written directly in a framework's own layers; this module describes that network as
data, so every backend's plain reference is built from one list and cannot drift. Its weights
are the deploy state's `<prefix>.rbr_reparam.{weight,bias}` and `linear.{weight,bias}`:

    y = linear(mean_hw(act_n(conv_n(... act_1(conv_1(x))))))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..blocks.nodes import SE, Act, Block, Conv, Model, SpecLike, in_form, join_key
from ..errors import ReparamError


@dataclass(frozen=True)
class PlainConv:
    """One conv (with bias) and its activation; `key` is the deploy-state prefix of its weights."""

    key: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    dilation: int
    groups: int
    act: Literal["relu", "silu", "identity"]


_ONLY = "only RepVGG's conv/activation stacks with a pooled `linear` head have one"


def _plain_conv(path: str, block: Block) -> PlainConv:
    """The block as one conv + activation, or ReparamError saying what else it holds."""
    if any(isinstance(n, SE) for n in block.body):
        raise ReparamError(f"block {path} has SE ({_ONLY})")
    c, act = block.body if len(block.body) == 2 else (None, None)
    if not isinstance(c, Conv) or not isinstance(act, Act):
        raise ReparamError(
            f"block {path} ({block.kind}) is not a conv followed by an activation "
            "in deploy form: " + ", ".join(type(n).__name__ for n in block.body) + f" ({_ONLY})"
        )
    if (
        c.kernel[0] != c.kernel[1]
        or c.stride[0] != c.stride[1]
        or c.padding[0] != c.padding[1]
        or c.dilation[0] != c.dilation[1]
        or act.fn not in ("relu", "silu", "identity")
    ):
        raise ReparamError(f"block {path}: the plain reference has square convs and relu/silu only ({_ONLY})")
    return PlainConv(
        join_key(path, c.name),
        c.in_channels,
        c.out_channels,
        c.kernel[0],
        c.stride[0],
        c.padding[0],
        c.dilation[0],
        c.groups,
        act.fn,
    )


def plain_layers(spec: SpecLike) -> list[PlainConv]:
    """The conv stack of a deploy form, in forward order (the head is `linear`).

    Only plain stacks have one: a deploy form made of conv + activation blocks, then a global
    pool, a flatten and the linear `linear` (RepVGG without SE). Other specs raise ReparamError
    saying why."""
    desc = in_form(spec, "deploy")
    name = getattr(desc, "name", type(spec).__name__)
    head = tuple(type(n).__name__ for n in desc.body[-3:])
    if (
        not isinstance(desc, Model)
        or head != ("GlobalPool", "Flatten", "Linear")
        or getattr(desc.body[-1], "name", "") != "linear"
    ):
        raise ReparamError(f"{name!r} has no plain reference: {_ONLY}")
    out = []
    for node in desc.body[:-3]:
        if not isinstance(node, Block):
            raise ReparamError(f"{name!r} has no plain reference: {type(node).__name__} outside a block ({_ONLY})")
        try:
            out.append(_plain_conv(node.name, node))
        except ReparamError as e:
            raise ReparamError(f"{name!r} has no plain reference: {e}") from None
    return out


def has_plain_reference(spec: SpecLike) -> bool:
    """Whether plain_layers(spec) exists."""
    try:
        plain_layers(spec)
    except ReparamError:
        return False
    return True


__all__ = ["PlainConv", "plain_layers", "has_plain_reference"]
