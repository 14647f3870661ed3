"""The plain reference of a deploy-form RepVGG: the conv/activation stack as a list of layers.

A benchmark compares the deploy form (our blocks after re-parameterization) with the same
network written directly in a framework's own layers; this module describes that network as
data, so every backend's plain reference is built from one list and cannot drift. Its weights
are the deploy state's `<prefix>.rbr_reparam.{weight,bias}` and `linear.{weight,bias}`:

    y = linear(mean_hw(act_n(conv_n(... act_1(conv_1(x))))))
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ReparamError
from .specs import Act, ModelSpec, RepVGGSpec


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
    act: Act


def plain_layers(spec: ModelSpec) -> list[PlainConv]:
    """The conv stack of a RepVGG deploy form, in forward order (the head is `linear`).

    Only plain stacks have one: RepVGG without SE. Other specs raise ReparamError saying why."""
    if not isinstance(spec, RepVGGSpec) or spec.family != "repvgg":
        raise ReparamError(f"{getattr(spec, 'name', spec)!r} has no plain reference: only RepVGG "
                           "(conv/activation stacks) does")
    out = []
    for prefix, b in spec.blocks():
        if b.se != "none":
            raise ReparamError(f"{spec.name!r} has no plain reference: block {prefix} has SE")
        out.append(PlainConv(f"{prefix}.rbr_reparam", b.in_channels, b.out_channels,
                             b.kernel_size, b.stride, b.padding, b.dilation, b.groups, b.act))
    return out


def has_plain_reference(spec: ModelSpec) -> bool:
    """Whether plain_layers(spec) exists."""
    try:
        plain_layers(spec)
    except ReparamError:
        return False
    return True


__all__ = ["PlainConv", "plain_layers", "has_plain_reference"]
